/* rkkernel runtime for CUDA (NVRTC): the CUDA prelude. It spells in CUDA the
 * names the shared runtime (rk_runtime_cl.h: control block, queues, step
 * boundary) is written in, and holds what every .cu kernel starts with. The
 * runtime compiles this file, then rk_runtime_cl.h, then the user's source;
 * same layout and semantics as rkkernel/control.py.
 */
#define RK_CUDA 1

typedef unsigned int rk_u32;
typedef unsigned long long rk_u64;

#define RK_ALIGN8 __align__(8)
#define RK_FUNC __device__
#define RK_KERNEL extern "C" __global__
#define RK_GLOBAL
/* The control block as the runtime's functions see it: volatile, because in
 * the persistent loop other blocks read it between grid syncs. */
#define RK_CTL volatile rk_control
/* rk_advance runs in one thread of the grid; its writes are fenced. */
#define RK_LEADER (blockIdx.x == 0 && threadIdx.x == 0)
#define RK_ADVANCE_FENCE() __threadfence()

#define RK_BEGIN(ctl) if (((volatile rk_control *)(ctl))->is_active == 0u) return

/* One thread per interior cell: x from the block's threads (rows padded to
 * whole blocks, so the threads past nx-2 return), y and z from the grid. */
#define RK_INTERIOR_CELL(x, y, z, i, nx, nxy)                        \
    const int x = (int)(blockIdx.x * blockDim.x + threadIdx.x) + 1; \
    if (x >= (nx) - 1) return;                                       \
    const int y = (int)blockIdx.y + 1;                               \
    const int z = (int)blockIdx.z + 1;                               \
    const int i = x + y * (nx) + z * (nxy)

/* See rk_runtime_cl.h: IEEE arithmetic (built with --ftz=false), stored
 * values with |x| < FLT_MIN become +0.0f. */
__device__ __forceinline__ float rk_ftz(const float x)
{
    const unsigned int u = __float_as_uint(x);
    return __uint_as_float((u & 0x7fffffffu) >= 0x00800000u ? u : 0u);
}
