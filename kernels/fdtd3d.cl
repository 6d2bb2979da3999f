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

/* One cell update, c pointing at the cell: the stencil's arithmetic, in the
 * one order every back end uses (numpy_step mirrors it), flushed as stored. */
inline float fdtd_cell(__global const float *restrict c, const float prev, const float v,
                       const float r2, const int nx, const int nxy, const float src)
{
    const float p = c[0];
    float s = c[-1] + c[1];
    s = s + c[-nx];
    s = s + c[nx];
    s = s + c[-nxy];
    s = s + c[nxy];
    const float lap = s - 6.0f * p;
    const float coef = (v * v) * r2;
    const float acc = coef * lap;
    const float base = 2.0f * p - prev;
    const float upd = base + acc;
    return rk_ftz(upd + src);
}

/* The source amplitude of a step: the wavelet while it lasts, then zero. */
inline float fdtd_amplitude(const ulong step, __global const float *restrict wavelet, const int wavelet_len)
{
    const int live = step < (ulong)wavelet_len;  /* no min(): pocl keeps it an un-inlined call */
    const float w = wavelet[live ? (int)step : wavelet_len - 1];
    return live ? w : 0.0f;
}

/* The parameters every fdtd kernel starts with (cur_const: const, or nothing
 * for the sweeps, whose levels write both fields), and the same as arguments. */
#define FDTD_FIELDS(cur_const)                                                                        \
    __global const rk_control *restrict ctl, __global cur_const float *restrict cur,                  \
        __global float *restrict prev_next, __global const float *restrict vel,                       \
        __global const float *restrict wavelet, const float r2, const int nx, const int nxy,          \
        const int src_index, const int wavelet_len
#define FDTD_FIELD_ARGS ctl, cur, prev_next, vel, wavelet, r2, nx, nxy, src_index, wavelet_len

inline void fdtd_rows(FDTD_FIELDS(const), const int z0, __global const uint *restrict x_interior,
                      const int with_source)
{
    const size_t x = get_global_id(0);         /* 0 .. nx-1: the whole row, walls included */
    const int y = (int)get_global_id(1) + 1;
    const int z = (int)get_global_id(2) + z0;
    const int row = y * nx + z * nxy;          /* first cell (a wall) of the row */
    __global const float *c = cur + row;
    __global float *out = prev_next + row;
    __global const float *vrow = vel + z * nx;  /* 2-D (z, x) model: stays in cache */

    float src = 0.0f;
    if (with_source)  /* compile-time constant after inlining; a select, not a branch */
        src = ((int)get_global_id(0) == src_index - row) ? fdtd_amplitude(ctl->current_step, wavelet, wavelet_len) : 0.0f;
    /* c[x - 1] at x = 0 and c[x + 1] at x = nx-1 read the neighbouring rows'
     * walls (in bounds: y and z are interior); the mask discards those cells. */
    out[x] = as_float(as_uint(fdtd_cell(c + x, out[x], vrow[x], r2, nx, nxy, src)) & x_interior[x]);
}

/* Planes z0 .. z0 + global_size(2) - 1, including the source's plane. */
__kernel void fdtd_step(FDTD_FIELDS(const), const int z0, __global const uint *restrict x_interior)
{
    RK_BEGIN(ctl);
    fdtd_rows(FDTD_FIELD_ARGS, z0, x_interior, 1);
}

/* Planes z0 .. z0 + global_size(2) - 1, none of which holds the source. */
__kernel void fdtd_bulk(FDTD_FIELDS(const), const int z0, __global const uint *restrict x_interior)
{
    RK_BEGIN(ctl);
    fdtd_rows(FDTD_FIELD_ARGS, z0, x_interior, 0);
}

/* ------------------------------------------------------------------------
 * Several steps per sweep, for CPU devices (temporal blocking).
 *
 * At 256^3 the fields are 64 MiB each and a step streams them from memory,
 * 12 bytes per cell. fdtd_sweep does `levels` steps in one sweep over z:
 * at sweep position z, level j (step t+j) updates plane z-j, reading level
 * j-1's planes z-j-1 .. z-j+1, which the same sweep has just made and are
 * still in cache. Levels alternate between the two fields in place, as
 * single steps do, so each byte crosses the memory bus once per `levels`
 * steps. The arithmetic is fdtd_rows' own, operation for operation, so the
 * bits are those of single steps.
 *
 * Work item i sweeps slab i of the interior planes (one slab per CPU core,
 * each at least 2*levels planes), so each core keeps its own planes in its
 * own caches (handing planes out in turn to the cores ran at half the
 * speed). Near a boundary between slabs a level needs the other slab's
 * previous level, and would overwrite values the other slab still reads,
 * so in a slab level j covers only [lo + j, hi - j] (the full range at the
 * walls, which never change). The planes left out around a boundary (level
 * j: the 2j planes nearest it) are done afterwards, level by level, by
 * whichever of the two slabs finishes second (an atomic counter per
 * boundary in sync[]). No work item ever waits for another, so this is
 * correct with any number of threads on any device; it is fast on CPUs
 * only, where one work item per core is the whole device
 * (FusedSteps.device_types). The schedule itself is RK_SLAB_SWEEP in
 * rk_runtime_cl.h, shared with tt_sweep in traveltime.cl.
 *
 * A work item works its planes as explicit loops, which LLVM vectorises.
 * pocl's work-group vectoriser (whole rows, as fdtd_rows) cannot express a
 * sweep: across the barrier the ordering would need, pocl keeps every
 * private value per work item and runs the body scalar, ~10x slower.
 *
 * sync: word b counts the slabs beside boundary b (between slab b and b+1)
 * that are done; the runtime zeroes it before every launch.
 */

/* Interior rows of plane z, one step (cur -> prev_next, in place). The
 * source cell, if in this plane, is computed with the +0.0f of every other
 * cell first and then again, from its saved old value, with its amplitude:
 * a per-cell source test in the vectorised loop would cost a quarter of
 * its speed. */
inline void fdtd_plane(__global const float *restrict cur, __global float *restrict prev_next,
                       __global const float *restrict vel, __global const float *restrict wavelet,
                       const float r2, const int nx, const int nxy, const int src_index,
                       const int wavelet_len, __global const uint *restrict x_interior,
                       const int z, const ulong step)
{
    const int ny = nxy / nx;
    const int src_z = src_index / nxy;
    const int src_y = (src_index - src_z * nxy) / nx;
    const int src_x = src_index - src_z * nxy - src_y * nx;
    __global const float *restrict vrow = vel + z * nx;
    for (int y = 1; y < ny - 1; ++y) {
        const int row = y * nx + z * nxy;
        __global const float *restrict c = cur + row;
        __global float *restrict out = prev_next + row;
        const float saved = out[src_x];
        for (int x = 0; x < nx; ++x)
            out[x] = as_float(as_uint(fdtd_cell(c + x, out[x], vrow[x], r2, nx, nxy, 0.0f)) & x_interior[x]);
        if (z == src_z && y == src_y)
            out[src_x] = fdtd_cell(c + src_x, saved, vrow[src_x], r2, nx, nxy,
                                   fdtd_amplitude(step, wavelet, wavelet_len));
    }
}

#ifdef cl_khr_fp64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#define RK_SWEEP_SAMPLES 1
#define RK_SUMS_T double
#else
#define RK_SWEEP_SAMPLES 0
#define RK_SUMS_T float  /* unused: no sampled sweep without float64 */
#endif

#if RK_SWEEP_SAMPLES
/* Σp² of plane z of f in the order of rkkernel/reduce.py (columns over y, then
 * the plane over x), into out[z]; col: nx doubles of this work item's scratch.
 * Called by a sampled sweep right after it wrote the plane, still in cache. */
inline void fdtd_plane_sumsq(__global const float *restrict f, __global double *restrict col,
                             __global double *restrict out, const int nx, const int nxy, const int z)
{
    __global const float *restrict plane = f + z * nxy;
    const int ny = nxy / nx;
    for (int x = 0; x < nx; ++x)
        col[x] = 0.0;
    for (int y = 0; y < ny; ++y) {
        __global const float *restrict row = plane + y * nx;
        for (int x = 0; x < nx; ++x) {
            const double v = (double)row[x];
            col[x] = col[x] + v * v;
        }
    }
    volatile double acc = 0.0;  /* volatile: a CPU compiler must not regroup these additions */
    for (int x = 0; x < nx; ++x)
        acc = acc + col[x];
    out[z] = acc;
}

#endif

/* The parameters of both sweep kernels, and the same as arguments. */
#define FDTD_SWEEP_FIELDS                                                                            \
    FDTD_FIELDS(/* writable */), const int nz, __global const uint *restrict x_interior,             \
        __global volatile uint *sync, const int levels
#define FDTD_SWEEP_ARGS FDTD_FIELD_ARGS, nz, x_interior, sync, levels

/* The sweep (RK_SLAB_SWEEP); with sample_levels != 0 (bit j: sample the field level j makes, step t+j+1)
 * also the plane sums of those levels, row sample_row + (rank of j among the set bits)
 * of sums (nz doubles a row), each plane summed right after it is written. */
inline void fdtd_sweep_body(FDTD_SWEEP_FIELDS,
                            __global RK_SUMS_T *restrict sums, __global RK_SUMS_T *restrict cols,
                            const int sample_levels, const int sample_row)
{
    const ulong t = ctl->current_step;
#define LEVEL_OUT(j) (((j) & 1) ? cur : prev_next)
#if RK_SWEEP_SAMPLES
#define SAMPLE(s, j, z) if ((sample_levels >> (j)) & 1) \
        fdtd_plane_sumsq(LEVEL_OUT(j), cols + (s) * nx, \
                         sums + (sample_row + popcount(sample_levels & ((1 << (j)) - 1))) * nz, nx, nxy, (z))
#else
#define SAMPLE(s, j, z) (void)0
#endif
#define LEVEL(s, j, z) fdtd_plane(((j) & 1) ? prev_next : cur, LEVEL_OUT(j), vel, wavelet, r2, nx, nxy, \
                                  src_index, wavelet_len, x_interior, (z), t + (ulong)(j)); \
                       SAMPLE(s, j, z)
/* the wall planes (never written) of a sampled level */
#define SAMPLE_WALLS(s, slabs) for (int j = 0; j < levels; ++j) { \
        if ((s) == 0) { \
            SAMPLE(s, j, 0); \
        } \
        if ((s) == (slabs) - 1) { \
            SAMPLE(s, j, nz - 1); \
        } \
    }
    RK_SLAB_SWEEP(nz, levels, sync, LEVEL, SAMPLE_WALLS);
#undef SAMPLE_WALLS
#undef LEVEL
#undef SAMPLE
#undef LEVEL_OUT
}

/* Global size: the number of slabs (>= 1, each at least 2*levels planes), local size 1. */
__kernel void fdtd_sweep(FDTD_SWEEP_FIELDS)
{
    RK_BEGIN(ctl);
    fdtd_sweep_body(FDTD_SWEEP_ARGS, 0, 0, 0, 0);
}

#if RK_SWEEP_SAMPLES
/* fdtd_sweep that also records the energy (Σp², see fdtd_sweep_body) of the levels in
 * sample_levels: a sample inside a batch costs no extra pass over memory. */
__kernel void fdtd_sweep_sampled(FDTD_SWEEP_FIELDS, __global double *restrict sums, __global double *restrict cols,
                                 const int sample_levels, const int sample_row)
{
    RK_BEGIN(ctl);
    fdtd_sweep_body(FDTD_SWEEP_ARGS, sums, cols, sample_levels, sample_row);
}
#endif
