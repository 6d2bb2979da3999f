/* First-arrival traveltimes by shortest-path relaxation on the grid, float32.
 *
 * Each step relaxes every interior cell from the previous step's field only
 * (Jacobi order, ping-pong between two buffers), over its 26 neighbours:
 *   t' = min(t, m1 + h1*s, m2 + h2*s, m3 + h3*s)
 * where m1, m2, m3 are the smallest neighbour times at distance 1, sqrt 2
 * and sqrt 3 cells, s the cell's slowness (2-D (z, x) model, in cache) and
 * hk = dx * sqrt(k). Every operation is a min, one float32 multiply or one
 * add, each exact or correctly rounded (FP_CONTRACT OFF), and the minima
 * are exact in any grouping, so NumPy, OpenCL and CUDA give identical fields.
 * Times are +0, positive or +inf, never NaN or -0, so the min of two times
 * is the min of their bit patterns read as ints (TT_IMIN): exact too, and
 * it vectorises (a float select-min stayed scalar in pocl's loop vectoriser;
 * fmin() is an un-inlined call there).
 *
 * Two kernels, the same bits:
 * - tt_step, one step, one work item per interior cell (what a GPU runs,
 *   and a CPU between fused sweeps); wall cells are never written and stay
 *   +inf. A cell that got earlier stores the step count into last[0]; all
 *   writers of one step store the same value, and launches are ordered, so
 *   the host reads the last step that changed anything: the run has
 *   converged once a step left everything as it was.
 * - tt_sweep, several steps per sweep over z on a CPU (below).
 */

/* The min of non-negative floats (+0 .. +inf, never NaN or -0) is the min of
 * their bit patterns as integers. */
#define TT_IMIN(a, b) ((a) < (b) ? (a) : (b))

/* One cell (c: the cell in the input field, as ints); inlined everywhere, so
 * the loops around it vectorise (a call inside a loop stops LLVM). */
__attribute__((always_inline)) inline int tt_cell(__global const int *restrict c, const float sl, const float h1, const float h2,
                   const float h3, const int nx, const int nxy)
{
    const int m1 = TT_IMIN(TT_IMIN(c[-1], c[1]), TT_IMIN(TT_IMIN(c[-nx], c[nx]), TT_IMIN(c[-nxy], c[nxy])));
    int m2 = TT_IMIN(TT_IMIN(TT_IMIN(c[-nx - 1], c[-nx + 1]), TT_IMIN(c[nx - 1], c[nx + 1])),
                     TT_IMIN(TT_IMIN(c[-nxy - 1], c[-nxy + 1]), TT_IMIN(c[nxy - 1], c[nxy + 1])));
    m2 = TT_IMIN(m2, TT_IMIN(TT_IMIN(c[-nxy - nx], c[-nxy + nx]), TT_IMIN(c[nxy - nx], c[nxy + nx])));
    const int m3 = TT_IMIN(TT_IMIN(TT_IMIN(c[-nxy - nx - 1], c[-nxy - nx + 1]), TT_IMIN(c[-nxy + nx - 1], c[-nxy + nx + 1])),
                           TT_IMIN(TT_IMIN(c[nxy - nx - 1], c[nxy - nx + 1]), TT_IMIN(c[nxy + nx - 1], c[nxy + nx + 1])));
    int t = TT_IMIN(c[0], as_int(as_float(m1) + h1 * sl));
    t = TT_IMIN(t, as_int(as_float(m2) + h2 * sl));
    return TT_IMIN(t, as_int(as_float(m3) + h3 * sl));
}

__kernel void tt_step(__global const rk_control *restrict ctl,
                      __global const int *restrict cur,
                      __global int *restrict nxt,
                      __global const float *restrict slow,
                      __global uint *restrict last,
                      const float h1, const float h2, const float h3,
                      const int nx, const int nxy, const int cz0, const int cz1)
{
    RK_BEGIN(ctl);
    const size_t x = get_global_id(0) + 1;
    const int y = (int)get_global_id(1) + 1;
    const int z = (int)get_global_id(2) + 1;
    const int row = y * nx + z * nxy;
    __global const int *c = cur + row;
    const int old = c[x];
    const int t = tt_cell(c + x, slow[z * nx + x], h1, h2, h3, nx, nxy);  /* 2-D (z, x) model: stays in cache */
    nxt[row + x] = t;
    if (t != old && z >= cz0 && z < cz1)  /* planes [cz0, cz1) count (a slab: its owned planes) */
        last[0] = (uint)(ctl->current_step + 1ul);
}

/* ------------------------------------------------------------------------
 * Several steps per sweep, for CPU devices (temporal blocking), as
 * fdtd_sweep in fdtd3d.cl: at sweep position z, level j (step t+j) relaxes
 * plane z-j from level j-1's planes z-j-1 .. z-j+1, still in cache; levels
 * alternate between the two buffers, and the plane a level overwrites
 * holds level j-2's values, which no level still needs (the same argument
 * as fdtd_sweep). One work item per slab and the same slab/boundary
 * scheme (RK_SLAB_SWEEP in rk_runtime_cl.h), so no work item ever waits
 * for another.
 *
 * A work item works its rows as explicit loops over 16-cell vectors
 * (int16, one AVX-512 register; pocl's auto-vectoriser picked 8-wide ones,
 * and on Intel's OpenCL the plain loop ran ~5x slower), two rows at a time: rows y and y+1 share
 * 12 of their 18 neighbour rows, so the loads and the x-pair minima
 * min(x-1, x+1) of a neighbour row serve both. Whole rows, walls included
 * and then set back to +inf, so a row is whole vectors (a scalar remainder
 * of 14 cells in 126 cost two thirds of the time); only the grid's first
 * and last interior rows, whose corner neighbours at x = -1 and x = nx lie
 * outside the field, are done over the interior. All of this regroups
 * minima only, so the bits are tt_step's.
 *
 * A change is not stored per cell (a conditional store stops the
 * vectoriser): each row or-reduces t ^ old (t <= old, so it is nonzero
 * exactly when a cell got earlier), and each work item raises last[0] to
 * the latest step that changed anything (atomic_max: levels of different
 * slabs finish in any order; a single step stores the same count, and
 * counts only grow, so the two agree).
 */

/* 16 ints at any 4-byte aligned address: a plain unaligned vector load or
 * store (vload16/vstore16 stay un-inlined calls in pocl). */
typedef int tt_int16u __attribute__((ext_vector_type(16), aligned(4)));
typedef float tt_float16u __attribute__((ext_vector_type(16), aligned(4)));
#define TT_LOAD16(p) (*(__global const tt_int16u *)(p))

/* tt_cell for the 16 cells x .. x+15 of a row, given the nine rows around
 * it (r<dz><dy>, m: -1, 0: the row itself, p: +1): fixed displacements
 * from nine row pointers, so the loop needs no per-load address arithmetic. */
#define TT_ROWS(c, nx, nxy)                                                                           \
    __global const int *restrict rmm = (c) - (nxy) - (nx), *restrict rm0 = (c) - (nxy), *restrict rmp = (c) - (nxy) + (nx); \
    __global const int *restrict r0m = (c) - (nx), *restrict r00 = (c), *restrict r0p = (c) + (nx);                 \
    __global const int *restrict rpm = (c) + (nxy) - (nx), *restrict rp0 = (c) + (nxy), *restrict rpp = (c) + (nxy) + (nx)

#define TT_CELL16(x, sl, h1, h2, h3, out)                                                                             \
    do {                                                                                                            \
        const int16 m1_ = TT_IMIN(TT_IMIN(TT_LOAD16(r00 + (x) - 1), TT_LOAD16(r00 + (x) + 1)),                     \
                                  TT_IMIN(TT_IMIN(TT_LOAD16(r0m + (x)), TT_LOAD16(r0p + (x))),                     \
                                          TT_IMIN(TT_LOAD16(rm0 + (x)), TT_LOAD16(rp0 + (x)))));                   \
        int16 m2_ = TT_IMIN(TT_IMIN(TT_IMIN(TT_LOAD16(r0m + (x) - 1), TT_LOAD16(r0m + (x) + 1)),                   \
                                    TT_IMIN(TT_LOAD16(r0p + (x) - 1), TT_LOAD16(r0p + (x) + 1))),                  \
                            TT_IMIN(TT_IMIN(TT_LOAD16(rm0 + (x) - 1), TT_LOAD16(rm0 + (x) + 1)),                   \
                                    TT_IMIN(TT_LOAD16(rp0 + (x) - 1), TT_LOAD16(rp0 + (x) + 1))));                 \
        m2_ = TT_IMIN(m2_, TT_IMIN(TT_IMIN(TT_LOAD16(rmm + (x)), TT_LOAD16(rmp + (x))),                            \
                                   TT_IMIN(TT_LOAD16(rpm + (x)), TT_LOAD16(rpp + (x)))));                          \
        const int16 m3_ = TT_IMIN(TT_IMIN(TT_IMIN(TT_LOAD16(rmm + (x) - 1), TT_LOAD16(rmm + (x) + 1)),             \
                                          TT_IMIN(TT_LOAD16(rmp + (x) - 1), TT_LOAD16(rmp + (x) + 1))),            \
                                  TT_IMIN(TT_IMIN(TT_LOAD16(rpm + (x) - 1), TT_LOAD16(rpm + (x) + 1)),             \
                                          TT_IMIN(TT_LOAD16(rpp + (x) - 1), TT_LOAD16(rpp + (x) + 1))));           \
        int16 t_ = TT_IMIN(TT_LOAD16(r00 + (x)), as_int16(as_float16(m1_) + (h1) * (sl)));                       \
        t_ = TT_IMIN(t_, as_int16(as_float16(m2_) + (h2) * (sl)));                                                 \
        (out) = TT_IMIN(t_, as_int16(as_float16(m3_) + (h3) * (sl)));                                              \
    } while (0)

/* The OR of the 16 lanes of *v (by pointer: an int16 argument changes the
 * ABI without AVX-512, and pocl warns). */
__attribute__((always_inline)) inline int tt_or_reduce16(const int16 *v)
{
    const int8 c8 = v->lo | v->hi;
    const int4 c4 = c8.lo | c8.hi;
    const int2 c2 = c4.lo | c4.hi;
    return c2.x | c2.y;
}

/* Cells x0 .. x1-1 of one row, one cell at a time (the scalar remainder of
 * the vector loops); nonzero if some cell got earlier. */
__attribute__((always_inline)) inline int tt_cells(__global const int *restrict c, __global int *restrict o,
                                                   __global const float *restrict srow, const float h1,
                                                   const float h2, const float h3, const int nx, const int nxy,
                                                   const int x0, const int x1)
{
    int changed = 0;
    for (int x = x0; x < x1; ++x) {
        const int old = c[x];
        int t = tt_cell(c + x, srow[x], h1, h2, h3, nx, nxy);
        t = (x == 0 || x == nx - 1) ? 0x7f800000 : t;
        o[x] = t;
        changed |= t ^ old;
    }
    return changed;
}

/* Cells x0 .. x1-1 of one row (c: the row in the input, o: in the output),
 * one step; nonzero if some cell got earlier. */
inline int tt_row(__global const int *restrict c, __global int *restrict o,
                  __global const float *restrict srow, const float h1, const float h2, const float h3,
                  const int nx, const int nxy, const int x0, const int x1)
{
    const int16 lane = (int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int16 changed16 = (int16)(0);
    TT_ROWS(c, nx, nxy);
    int x = x0;
    for (; x + 16 <= x1; x += 16) {
        const float16 sl = *(__global const tt_float16u *)(srow + x);
        int16 t;
        TT_CELL16(x, sl, h1, h2, h3, t);
        const int16 i = lane + x;
        t = (i == 0 | i == nx - 1) ? (int16)(0x7f800000) : t;  /* the walls stay +inf */
        *(__global tt_int16u *)(o + x) = t;
        changed16 |= t ^ TT_LOAD16(r00 + x);
    }
    return tt_cells(c, o, srow, h1, h2, h3, nx, nxy, x, x1) | tt_or_reduce16(&changed16);
}

/* One row's 16 cells from their old times a and their minima m1, m2, m3 at
 * distance 1, sqrt 2 and sqrt 3 (tt_cell's sums), walls back to +inf, stored
 * at out; changed16 collects t ^ a. For tt_row2 (sl, wall, h1..h3 in scope). */
#define TT_RELAX16(a, m1, m2, m3, out)                                     \
    do {                                                                   \
        int16 t_ = TT_IMIN((a), as_int16(as_float16(m1) + h1 * sl));      \
        t_ = TT_IMIN(t_, as_int16(as_float16(m2) + h2 * sl));              \
        t_ = TT_IMIN(t_, as_int16(as_float16(m3) + h3 * sl));              \
        t_ = wall ? (int16)(0x7f800000) : t_;                              \
        *(__global tt_int16u *)(out) = t_;                                 \
        changed16 |= t_ ^ (a);                                             \
    } while (0)

/* Two whole rows y and y+1 at once (c: row y in the input, o: in the
 * output): they share 12 of their 18 neighbour rows, so each row's loads
 * and x-pair minima (b = min(x-1, x+1)) are done once for both. Same
 * minima, same sums: the bits of tt_row. */
inline int tt_row2(__global const int *restrict c, __global int *restrict o,
                   __global const float *restrict srow, const float h1, const float h2, const float h3,
                   const int nx, const int nxy)
{
    const int16 lane = (int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int16 changed16 = (int16)(0);
    /* r<dz><dy>: dz in m, 0, p; dy in m (-1), 0, p (+1), q (+2) */
    __global const int *restrict rmm = c - nxy - nx, *restrict rm0 = c - nxy, *restrict rmp = c - nxy + nx, *restrict rmq = c - nxy + 2 * nx;
    __global const int *restrict r0m = c - nx, *restrict r00 = c, *restrict r0p = c + nx, *restrict r0q = c + 2 * nx;
    __global const int *restrict rpm = c + nxy - nx, *restrict rp0 = c + nxy, *restrict rpp = c + nxy + nx, *restrict rpq = c + nxy + 2 * nx;
    int x = 0;
    for (; x + 16 <= nx; x += 16) {
#define A(r) TT_LOAD16((r) + x)
#define B(r) TT_IMIN(TT_LOAD16((r) + x - 1), TT_LOAD16((r) + x + 1))
        const float16 sl = *(__global const tt_float16u *)(srow + x);
        const int16 a_mm = A(rmm), a_m0 = A(rm0), a_mp = A(rmp), a_mq = A(rmq);
        const int16 a_0m = A(r0m), a_00 = A(r00), a_0p = A(r0p), a_0q = A(r0q);
        const int16 a_pm = A(rpm), a_p0 = A(rp0), a_pp = A(rpp), a_pq = A(rpq);
        const int16 b_mm = B(rmm), b_m0 = B(rm0), b_mp = B(rmp), b_mq = B(rmq);
        const int16 b_0m = B(r0m), b_00 = B(r00), b_0p = B(r0p), b_0q = B(r0q);
        const int16 b_pm = B(rpm), b_p0 = B(rp0), b_pp = B(rpp), b_pq = B(rpq);
#undef A
#undef B
        const int16 i = lane + x;
        const int16 wall = i == 0 | i == nx - 1;
        /* minima over dz = -1, +1 that both rows use (each in a different group) */
        const int16 za0 = TT_IMIN(a_m0, a_p0), zap = TT_IMIN(a_mp, a_pp);
        const int16 zb0 = TT_IMIN(b_m0, b_p0), zbp = TT_IMIN(b_mp, b_pp);
        /* row y: centre (0, 0) */
        TT_RELAX16(a_00, TT_IMIN(TT_IMIN(b_00, za0), TT_IMIN(a_0m, a_0p)),
                   TT_IMIN(TT_IMIN(TT_IMIN(b_0m, b_0p), zb0), TT_IMIN(TT_IMIN(a_mm, a_pm), zap)),
                   TT_IMIN(TT_IMIN(b_mm, b_pm), zbp), o + x);
        /* row y+1: centre (0, p) */
        TT_RELAX16(a_0p, TT_IMIN(TT_IMIN(b_0p, zap), TT_IMIN(a_00, a_0q)),
                   TT_IMIN(TT_IMIN(TT_IMIN(b_00, b_0q), zbp), TT_IMIN(TT_IMIN(a_mq, a_pq), za0)),
                   TT_IMIN(TT_IMIN(b_mq, b_pq), zb0), o + nx + x);
    }
    /* the remainder, row y then row y+1 (they read the input only, so in any order) */
    const int changed = tt_cells(c, o, srow, h1, h2, h3, nx, nxy, x, nx);
    return changed | tt_cells(c + nx, o + nx, srow, h1, h2, h3, nx, nxy, x, nx) | tt_or_reduce16(&changed16);
}
#undef TT_RELAX16

/* Interior rows of plane z, one step (in -> out); nonzero if some cell got earlier. */
inline int tt_plane(__global const int *restrict in, __global int *restrict out,
                    __global const float *restrict slow, const float h1, const float h2, const float h3,
                    const int nx, const int nxy, const int ny, const int nz, const int z)
{
    int changed = 0;
    __global const float *restrict srow = slow + z * nx;
    /* whole rows, except the first and last interior rows of the grid, whose
     * corner neighbours at x = -1 and x = nx would lie outside the field */
    int y = 1;
    if (z == 1) {
        changed |= tt_row(in + nx + nxy, out + nx + nxy, srow, h1, h2, h3, nx, nxy, 1, nx - 1);
        y = 2;
    }
    const int last = (z == nz - 2) ? ny - 3 : ny - 2;  /* the last row done whole */
    for (; y + 1 <= last; y += 2)
        changed |= tt_row2(in + y * nx + z * nxy, out + y * nx + z * nxy, srow, h1, h2, h3, nx, nxy);
    for (; y <= ny - 2; ++y) {
        const int edge = y > last;
        const int row = y * nx + z * nxy;
        changed |= tt_row(in + row, out + row, srow, h1, h2, h3, nx, nxy, edge ? 1 : 0, edge ? nx - 1 : nx);
    }
    return changed;
}

/* Global size: the number of slabs (>= 1, each at least 2*levels planes), local size 1. */
__kernel void tt_sweep(__global const rk_control *restrict ctl,
                       __global int *restrict cur,
                       __global int *restrict nxt,
                       __global const float *restrict slow,
                       __global uint *restrict last,
                       const float h1, const float h2, const float h3,
                       const int nx, const int nxy, const int ny, const int nz,
                       const int cz0, const int cz1, __global volatile uint *sync, const int levels)
{
    RK_BEGIN(ctl);
    const ulong t = ctl->current_step;
    int latest = -1;                                        /* highest level that changed a cell */
#define LEVEL(s, j, z) if (tt_plane(((j) & 1) ? nxt : cur, ((j) & 1) ? cur : nxt, slow, h1, h2, h3, nx, nxy, ny, nz, (z)) \
                           && (z) >= cz0 && (z) < cz1 && (j) > latest) latest = (j)
    RK_SLAB_SWEEP(nz, levels, sync, LEVEL, RK_SLAB_NOTHING);
#undef LEVEL
    if (latest >= 0)
        atomic_max(last, (uint)(t + (ulong)latest + 1ul));
}
