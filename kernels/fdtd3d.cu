/* 3D acoustic wave FDTD for CUDA: the same arithmetic as fdtd3d.cl, in the
 * same order (--fmad=false, --ftz=false: plain IEEE), stored values flushed
 * with rk_ftz, so results equal the NumPy reference bit for bit.
 *
 * fdtd_step:       one step per launch (the runtime's default path).
 * fdtd_persistent: a true persistent loop (cooperative launch, grid.sync()
 *                  between steps, step-boundary logic run by one thread),
 *                  used when the device supports cooperative launches.
 */

/* Plain pointers on purpose: in the persistent loop the fields are written
 * by other blocks between steps, so loads must not go through the
 * non-coherent read-only cache that __restrict__ const would allow. */
__device__ __forceinline__ float fdtd_cell(const float *cur, const float *prev, const float *vel,
                                           const int i, const int vi, const int nx, const int nxy, const float r2)
{
    const float p = cur[i];
    float s = __fadd_rn(cur[i - 1], cur[i + 1]);
    s = __fadd_rn(s, cur[i - nx]);
    s = __fadd_rn(s, cur[i + nx]);
    s = __fadd_rn(s, cur[i - nxy]);
    s = __fadd_rn(s, cur[i + nxy]);
    const float lap = __fsub_rn(s, __fmul_rn(6.0f, p));
    const float v = vel[vi];  /* 2-D (z, x) velocity model */
    const float coef = __fmul_rn(__fmul_rn(v, v), r2);
    const float acc = __fmul_rn(coef, lap);
    const float base = __fsub_rn(__fmul_rn(2.0f, p), prev[i]);
    return __fadd_rn(base, acc);  /* not flushed yet: the source is added first, as in NumPy */
}

extern "C" __global__ void fdtd_step(const rk_control *ctl, const float *__restrict__ cur, float *__restrict__ prev_next,
                                     const float *__restrict__ vel, const float *__restrict__ wavelet,
                                     const float r2, const int nx, const int nxy, const int src_index, const int wavelet_len)
{
    RK_BEGIN(ctl);
    RK_INTERIOR_CELL(x, y, z, i, nx, nxy);
    float out = fdtd_cell(cur, prev_next, vel, i, x + z * nx, nx, nxy, r2);
    const rk_u64 step = ((const volatile rk_control *)ctl)->current_step;
    const float w = wavelet[(int)(step < (rk_u64)(wavelet_len - 1) ? step : (rk_u64)(wavelet_len - 1))];
    const float amp = (step < (rk_u64)wavelet_len) ? w : 0.0f;
    out = rk_ftz(__fadd_rn(out, (i == src_index) ? amp : 0.0f));
    prev_next[i] = out;
}

#ifdef RK_PERSISTENT
/* Compiled only into the separate cooperative module (-DRK_PERSISTENT), so a
 * toolchain without cooperative-groups support still gets fdtd_step. */
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

extern "C" __global__ void fdtd_persistent(rk_control *ctl, const rk_message *h2k, rk_message *k2h,
                                           float *pa, float *pb, const float *__restrict__ vel,
                                           const float *__restrict__ wavelet, const float r2,
                                           const int nx, const int ny, const int nz,
                                           const int src_index, const int wavelet_len, const int nsteps)
{
    cg::grid_group grid = cg::this_grid();
    const bool leader = (blockIdx.x == 0 && threadIdx.x == 0);
    if (leader) rk_advance_dev(ctl, h2k, k2h, 0u);
    grid.sync();
    const int ix = nx - 2, iy = ny - 2, iz = nz - 2;
    const int interior = ix * iy * iz;
    const int nxy = nx * ny;
    const volatile rk_control *vc = ctl;
    for (int n = 0; n < nsteps; ++n) {
        if (vc->is_active == 0u) break;  /* same value in every block: read after grid.sync() */
        const rk_u64 step = vc->current_step;
        const float *cur = (step & 1ull) ? pb : pa;
        float *nxt = (step & 1ull) ? pa : pb;
        const float w = wavelet[(int)(step < (rk_u64)(wavelet_len - 1) ? step : (rk_u64)(wavelet_len - 1))];
        const float amp = (step < (rk_u64)wavelet_len) ? w : 0.0f;
        for (int t = (int)(blockIdx.x * blockDim.x + threadIdx.x); t < interior; t += (int)(gridDim.x * blockDim.x)) {
            const int x = t % ix + 1;
            const int yz = t / ix;
            const int y = yz % iy + 1;
            const int z = yz / iy + 1;
            const int i = x + y * nx + z * nxy;
            float out = fdtd_cell(cur, nxt, vel, i, x + z * nx, nx, nxy, r2);
            out = rk_ftz(__fadd_rn(out, (i == src_index) ? amp : 0.0f));
            nxt[i] = out;
        }
        grid.sync();
        if (leader) rk_advance_dev(ctl, h2k, k2h, 1u);
        grid.sync();
    }
}
#endif /* RK_PERSISTENT */
