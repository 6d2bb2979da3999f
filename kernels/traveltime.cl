/* First-arrival traveltimes by shortest-path relaxation on the grid, float32.
 *
 * Each step relaxes every interior cell from the previous step's field only
 * (Jacobi order, ping-pong between two buffers), over its 26 neighbours:
 *   t' = min(t, m1 + h1*s, m2 + h2*s, m3 + h3*s)
 * where m1, m2, m3 are the smallest neighbour times at distance 1, sqrt 2
 * and sqrt 3 cells, s the cell's slowness (2-D (z, x) model, in cache) and
 * hk = dx * sqrt(k). Every operation is a min, one float32 multiply or one
 * add, each exact or correctly rounded (FP_CONTRACT OFF), and adding the same
 * weight is monotone, so min(a, b) + w == min(a + w, b + w) bit for bit:
 * (tried: sharing per-plane partial minima along a z sweep, 11 selects a
 * cell instead of 23, ran 3x slower on pocl, scalar per work item or with
 * explicit float8 vectors alike: pocl vectorises across work items only)
 * NumPy, OpenCL and CUDA give identical fields. No NaN can arise (times are
 * +inf or finite and positive), so a select-min is exact too (fmin()
 * stays an un-inlined call in pocl and ran ~5x slower).
 *
 * Work items cover the interior of x rows (pocl vectorises over a row);
 * wall cells are never written and stay +inf. (Whole rows, as fdtd3d.cl
 * does, would read one element outside the field for the corner
 * neighbours of the first and last rows.) A cell that got earlier stores
 * the step count into last[0]; all writers of one step store the same value, and launches are
 * ordered, so the host reads the last step that changed anything: the run
 * has converged once a step left everything as it was.
 */

#define TT_MIN(a, b) ((a) < (b) ? (a) : (b))

__kernel void tt_step(__global const rk_control *restrict ctl,
                      __global const float *restrict cur,
                      __global float *restrict nxt,
                      __global const float *restrict slow,
                      __global uint *restrict last,
                      const float h1, const float h2, const float h3,
                      const int nx, const int nxy)
{
    RK_BEGIN(ctl);
    const size_t x = get_global_id(0) + 1;
    const int y = (int)get_global_id(1) + 1;
    const int z = (int)get_global_id(2) + 1;
    const int row = y * nx + z * nxy;
    __global const float *c = cur + row;
    __global const float *ym = c - nx;
    __global const float *yp = c + nx;
    __global const float *zm = c - nxy;
    __global const float *zp = c + nxy;
    __global const float *mm = zm - nx;
    __global const float *pm = zm + nx;
    __global const float *mp = zp - nx;
    __global const float *pp = zp + nx;

    const float m1 = TT_MIN(TT_MIN(c[x - 1], c[x + 1]), TT_MIN(TT_MIN(ym[x], yp[x]), TT_MIN(zm[x], zp[x])));
    float m2 = TT_MIN(TT_MIN(TT_MIN(ym[x - 1], ym[x + 1]), TT_MIN(yp[x - 1], yp[x + 1])),
                    TT_MIN(TT_MIN(zm[x - 1], zm[x + 1]), TT_MIN(zp[x - 1], zp[x + 1])));
    m2 = TT_MIN(m2, TT_MIN(TT_MIN(mm[x], pm[x]), TT_MIN(mp[x], pp[x])));
    const float m3 = TT_MIN(TT_MIN(TT_MIN(mm[x - 1], mm[x + 1]), TT_MIN(pm[x - 1], pm[x + 1])),
                          TT_MIN(TT_MIN(mp[x - 1], mp[x + 1]), TT_MIN(pp[x - 1], pp[x + 1])));
    __global const float *srow = slow + z * nx;  /* 2-D (z, x) model: stays in cache */
    __global float *o = nxt + row;
    const float sl = srow[x];
    const float old = c[x];
    float t = TT_MIN(old, m1 + h1 * sl);
    t = TT_MIN(t, m2 + h2 * sl);
    t = TT_MIN(t, m3 + h3 * sl);
    o[x] = t;
    if (t < old)
        last[0] = (uint)(ctl->current_step + 1ul);
}
