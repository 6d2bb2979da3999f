/* Σx² of a float32 (nz, ny, nx) field in the fixed order of rkkernel/reduce.py
 * (columns over y, then planes over x; the host adds the planes in z order).
 * Built as its own small program, only when a run samples on the device, so
 * the step kernels never need double precision. Every addition is float64;
 * a float32 squared in float64 is exact, so contraction could not change a
 * bit, and FP_CONTRACT is off anyway. */
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#pragma OPENCL FP_CONTRACT OFF

/* Global size (nx, nz): work item (x, z) sums column x of plane z over y = 0 .. ny-1. */
__kernel void rk_sumsq_columns(__global const float *restrict f, __global double *restrict col,
                               const int nx, const int ny)
{
    const size_t x = get_global_id(0);
    const size_t z = get_global_id(1);
    __global const float *restrict p = f + z * (size_t)ny * (size_t)nx;
    double acc = 0.0;
    for (int y = 0; y < ny; ++y) {
        const double v = (double)p[(size_t)y * (size_t)nx + x];
        acc = acc + v * v;
    }
    col[z * (size_t)nx + x] = acc;
}

/* Global size (nz): plane z's sum of its columns x = 0 .. nx-1, into out[offset + z]. */
__kernel void rk_sumsq_planes(__global const double *restrict col, __global double *restrict out,
                              const int nx, const int offset)
{
    const size_t z = get_global_id(0);
    __global const double *restrict c = col + z * (size_t)nx;
    volatile double acc = 0.0;  /* volatile: Intel's CPU compiler otherwise regroups this loop's additions */
    for (int x = 0; x < nx; ++x)
        acc = acc + c[x];
    out[(size_t)offset + z] = acc;
}
