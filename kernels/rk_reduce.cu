/* Σx² of a float32 (nz, ny, nx) field in the fixed order of rkkernel/reduce.py
 * (columns over y, then planes over x; the host adds the planes in z order):
 * the same two kernels as rk_reduce.cl. Compiled into every CUDA program
 * (cuda_backend.cuda_program), with --fmad=false like the step kernels. */

/* Grid (nx, nz) in threads: thread (x, z) sums column x of plane z over y = 0 .. ny-1. */
extern "C" __global__ void rk_sumsq_columns(const float *__restrict__ f, double *__restrict__ col,
                                            const int nx, const int ny, const int nz)
{
    const size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t z = blockIdx.y;
    if (x >= (size_t)nx || z >= (size_t)nz)
        return;
    const float *__restrict__ p = f + z * (size_t)ny * (size_t)nx;
    double acc = 0.0;
    for (int y = 0; y < ny; ++y) {
        const double v = (double)p[(size_t)y * (size_t)nx + x];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    col[z * (size_t)nx + x] = acc;
}

/* Grid (nz) in threads: plane z's sum of its columns x = 0 .. nx-1, into out[offset + z]. */
extern "C" __global__ void rk_sumsq_planes(const double *__restrict__ col, double *__restrict__ out,
                                           const int nx, const int nz, const int offset)
{
    const size_t z = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (z >= (size_t)nz)
        return;
    const double *__restrict__ c = col + z * (size_t)nx;
    double acc = 0.0;
    for (int x = 0; x < nx; ++x)
        acc = __dadd_rn(acc, c[x]);
    out[(size_t)offset + z] = acc;
}
