/* 3D acoustic wave, second-order leapfrog FDTD, 7-point Laplacian, float32.
 *
 * p_next = (2p - p_prev) + (v*v*r2) * lap(p), written over p_prev in place.
 * Launched over whole x rows of the interior y rows and z planes; the wall
 * columns x = 0 and x = nx-1 are computed too and stored as +0.0 through
 * the x_interior_mask region (all ones inside, zero on the walls), so the
 * walls stay zero (rigid). Whole rows keep every load and store an aligned,
 * full-width vector access: over the nx-2 interior cells only, the
 * vectoriser's scalar remainder loop cost ~15%. The velocity model is 2-D
 * (depth z by x, constant along y), small enough to stay in cache, so a cell
 * update moves 12 bytes (read cur and prev, write next). Every operation is
 * rounded to float32 in the written order (FP_CONTRACT OFF, IEEE subnormals)
 * and the stored value is flushed with rk_ftz, so NumPy, OpenCL and CUDA
 * give identical bits.
 *
 * Written for pocl's work-group vectoriser (a work-group is one x row in
 * each of two consecutive planes, x contiguous): addresses are a row
 * pointer (uniform, int arithmetic) plus the size_t global id, so every
 * load and store is a plain consecutive vector access. The per-cell source
 * test (i == src_index) cost ~25%: it keeps a 64-bit lane index vector
 * alive and shuffles it to 32 bits, so a step is split by z planes into
 * launches of fdtd_bulk (no source term) and one launch of fdtd_step for
 * the source plane (see wavesim.make_spec). In the bulk the source term is
 * the constant +0.0f, added exactly as the reference adds it, so the bits
 * are the same either way. Uniform ifs in the body (tried: "is the source
 * in this row?") make pocl stop vectorising; mixed int/size_t index
 * arithmetic runs 2-3x slower, and so does a wall test computed from the
 * index instead of loaded from the mask (~25%).
 */

inline void fdtd_rows(__global const rk_control *restrict ctl,
                      __global const float *restrict cur,
                      __global float *restrict prev_next,
                      __global const float *restrict vel,
                      __global const float *restrict wavelet,
                      const float r2, const int nx, const int nxy,
                      const int src_index, const int wavelet_len, const int z0,
                      __global const uint *restrict x_interior,
                      const int with_source)
{
    const size_t x = get_global_id(0);         /* 0 .. nx-1: the whole row, walls included */
    const int y = (int)get_global_id(1) + 1;
    const int z = (int)get_global_id(2) + z0;
    const int row = y * nx + z * nxy;          /* first cell (a wall) of the row */
    __global const float *c = cur + row;
    __global const float *cym = c - nx;
    __global const float *cyp = c + nx;
    __global const float *czm = c - nxy;
    __global const float *czp = c + nxy;
    __global float *out = prev_next + row;
    __global const float *vrow = vel + z * nx;  /* 2-D (z, x) model: stays in cache */

    const float p = c[x];
    float s = c[x - 1] + c[x + 1];
    s = s + cym[x];
    s = s + cyp[x];
    s = s + czm[x];
    s = s + czp[x];
    const float lap = s - 6.0f * p;
    const float v = vrow[x];
    const float coef = (v * v) * r2;
    const float acc = coef * lap;
    const float base = 2.0f * p - out[x];
    const float upd = base + acc;

    float src = 0.0f;
    if (with_source) {  /* compile-time constant after inlining */
        /* a select, not a branch; the wavelet sample is uniform */
        const ulong step = ctl->current_step;
        const int live = step < (ulong)wavelet_len;  /* no min(): pocl keeps it an un-inlined call */
        const float w = wavelet[live ? (int)step : wavelet_len - 1];
        const float amp = live ? w : 0.0f;
        src = ((int)get_global_id(0) == src_index - row) ? amp : 0.0f;
    }
    /* c[x - 1] at x = 0 and c[x + 1] at x = nx-1 read the neighbouring rows'
     * walls (in bounds: y and z are interior); the mask discards those cells. */
    out[x] = as_float(as_uint(rk_ftz(upd + src)) & x_interior[x]);
}

/* Planes z0 .. z0 + global_size(2) - 1, including the source's plane. */
__kernel void fdtd_step(__global const rk_control *restrict ctl,
                        __global const float *restrict cur,
                        __global float *restrict prev_next,
                        __global const float *restrict vel,
                        __global const float *restrict wavelet,
                        const float r2, const int nx, const int nxy,
                        const int src_index, const int wavelet_len, const int z0,
                        __global const uint *restrict x_interior)
{
    RK_BEGIN(ctl);
    fdtd_rows(ctl, cur, prev_next, vel, wavelet, r2, nx, nxy, src_index, wavelet_len, z0, x_interior, 1);
}

/* Planes z0 .. z0 + global_size(2) - 1, none of which holds the source. */
__kernel void fdtd_bulk(__global const rk_control *restrict ctl,
                        __global const float *restrict cur,
                        __global float *restrict prev_next,
                        __global const float *restrict vel,
                        __global const float *restrict wavelet,
                        const float r2, const int nx, const int nxy,
                        const int src_index, const int wavelet_len, const int z0,
                        __global const uint *restrict x_interior)
{
    RK_BEGIN(ctl);
    fdtd_rows(ctl, cur, prev_next, vel, wavelet, r2, nx, nxy, src_index, wavelet_len, z0, x_interior, 0);
}
