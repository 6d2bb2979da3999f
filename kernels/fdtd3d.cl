/* 3D acoustic wave, second-order leapfrog FDTD, 7-point Laplacian, float32.
 *
 * p_next = (2p - p_prev) + (v*v*r2) * lap(p), written over p_prev in place.
 * Launched over the interior only (global offset 1 in each axis is added by
 * hand), so the hot loop has no boundary tests; boundary cells stay zero
 * (rigid walls). The velocity model is 2-D (depth z by x, constant along y),
 * small enough to stay in cache, so a cell update moves 12 bytes (read cur
 * and prev, write next). Every operation is rounded to float32 in the
 * written order (FP_CONTRACT OFF, IEEE subnormals) and the stored value is
 * flushed with rk_ftz, so NumPy, OpenCL and CUDA give identical bits. All
 * index arithmetic is int (pocl runs mixed int/size_t arithmetic 2-3x
 * slower).
 */

__kernel void fdtd_step(__global const rk_control *restrict ctl,
                        __global const float *restrict cur,
                        __global float *restrict prev_next,
                        __global const float *restrict vel,
                        __global const float *restrict wavelet,
                        const float r2, const int nx, const int nxy,
                        const int src_index, const int wavelet_len)
{
    RK_BEGIN(ctl);
    const int x = (int)get_global_id(0) + 1;
    const int y = (int)get_global_id(1) + 1;
    const int z = (int)get_global_id(2) + 1;
    const int i = x + y * nx + z * nxy;

    const float p = cur[i];
    float s = cur[i - 1] + cur[i + 1];
    s = s + cur[i - nx];
    s = s + cur[i + nx];
    s = s + cur[i - nxy];
    s = s + cur[i + nxy];
    const float lap = s - 6.0f * p;
    const float v = vel[x + z * nx];  /* 2-D (z, x) model: stays in cache */
    const float coef = (v * v) * r2;
    const float acc = coef * lap;
    const float base = 2.0f * p - prev_next[i];
    const float upd = base + acc;

    /* Point source: a select, not a branch; the wavelet sample is uniform. */
    const ulong step = ctl->current_step;
    const int live = step < (ulong)wavelet_len;  /* no min(): pocl keeps it an un-inlined call */
    const float w = wavelet[live ? (int)step : wavelet_len - 1];
    const float amp = live ? w : 0.0f;
    prev_next[i] = rk_ftz(upd + ((i == src_index) ? amp : 0.0f));
}
