/* rkkernel runtime: control block, queues, step-boundary kernel, for OpenCL
 * and CUDA. The runtime prepends this file to the user's kernel source; for
 * CUDA it comes after rk_runtime_cuda.h, the CUDA prelude (which defines
 * RK_CUDA and the RK_ names below in CUDA).
 *
 * Layout must match rkkernel/control.py (CONTROL_BLOCK_DTYPE, MESSAGE_DTYPE);
 * the control block is the reference runtime's 128-byte ControlBlock, with the
 * step counter and queue capacities in its reserved bytes.
 */
#ifndef RK_CUDA
#pragma OPENCL FP_CONTRACT OFF

/* The OpenCL prelude (rk_runtime_cuda.h spells the same names in CUDA). */
typedef uint rk_u32;
typedef ulong rk_u64;

#define RK_ALIGN8 __attribute__((aligned(8)))
#define RK_FUNC inline
#define RK_KERNEL __kernel
#define RK_GLOBAL __global
#define RK_CTL __global rk_control  /* the control block as the runtime's functions see it */
#define RK_LEADER 1                 /* rk_advance is launched as one work item */
#define RK_ADVANCE_FENCE() (void)0

/* Every user step kernel starts with this: a paused or terminated kernel's
 * remaining launches in a batch do nothing. Uniform branch, no divergence. */
#define RK_BEGIN(ctl) if ((ctl)->is_active == 0u) return

/* Flush-to-zero of stored values, identical on every back end: |x| < FLT_MIN
 * becomes +0.0f. Arithmetic itself is plain IEEE (the runtime does NOT build
 * with -cl-denorms-are-zero: that flag lets a device flush intermediates or
 * not, and pocl does, so results would depend on the vendor). Flushing what
 * is stored keeps subnormals out of the fields, which is what costs CPU
 * speed; a handful of intermediates near the flush front may still be
 * subnormal for one operation. Integer mask instead of ?: so pocl
 * vectorises it (a select per operation ran ~10x slower). */
inline float rk_ftz(const float x)
{
    const uint u = as_uint(x);
    const uint keep = 0u - (uint)((u & 0x7fffffffu) >= 0x00800000u);
    return as_float(u & keep);
}
#endif /* !RK_CUDA */

typedef struct RK_ALIGN8 {
    rk_u32 is_active;
    rk_u32 should_terminate;
    rk_u32 has_terminated;
    rk_u32 _pad1;
    rk_u64 messages_processed;
    rk_u64 messages_in_flight;
    rk_u64 input_head;
    rk_u64 input_tail;
    rk_u64 output_head;
    rk_u64 output_tail;
    rk_u32 input_mask;
    rk_u32 output_mask;
    rk_u64 hlc_physical;
    rk_u64 hlc_logical;
    rk_u32 last_error;
    rk_u32 error_count;
    rk_u64 current_step;
    rk_u32 input_capacity;
    rk_u32 output_capacity;
    unsigned char _reserved[16];
} rk_control;

typedef struct RK_ALIGN8 {
    rk_u32 kind;
    rk_u32 arg;
    rk_u64 step;
    rk_u64 a;
    rk_u64 b;
} rk_message;

#define RK_CMD_SNAPSHOT 1u
#define RK_CMD_TERMINATE 2u
#define RK_CMD_INJECT 3u
#define RK_REPLY_SNAPSHOT_READY 1u
#define RK_REPLY_TERMINATED 2u
#define RK_REPLY_INJECT_READY 3u
#define RK_ERR_K2H_FULL 1u
#define RK_ERR_UNKNOWN_COMMAND 2u

RK_FUNC void rk_reply(RK_CTL *c, RK_GLOBAL rk_message *k2h, const rk_u32 kind, const rk_message m, const rk_u64 step)
{
    if (c->output_tail - c->output_head >= (rk_u64)c->output_mask + (rk_u64)1) {
        c->last_error = RK_ERR_K2H_FULL;
        c->error_count += 1u;
        return;
    }
    RK_GLOBAL rk_message *slot = &k2h[c->output_tail & (rk_u64)c->output_mask];
    slot->kind = kind;
    slot->arg = m.arg;
    slot->step = step;
    slot->a = m.a;
    slot->b = m.b;
    c->output_tail += (rk_u64)1;
}

/* Step boundary: step_done = 1 after a step, 0 for the poll that starts a
 * batch. Mirrors rkkernel.control.advance(). */
RK_FUNC void rk_advance_dev(RK_CTL *c, RK_GLOBAL const rk_message *h2k, RK_GLOBAL rk_message *k2h, const rk_u32 step_done)
{
    if (c->is_active == 0u) return;
    if (step_done != 0u) c->current_step += (rk_u64)1;
    const rk_u64 step = c->current_step;
    while (c->input_head != c->input_tail) {
        const rk_message m = h2k[c->input_head & (rk_u64)c->input_mask];
        if (m.step > step) break;
        c->input_head += (rk_u64)1;
        c->messages_processed += (rk_u64)1;
        c->hlc_logical += (rk_u64)1;
        if (m.kind == RK_CMD_TERMINATE) {
            c->should_terminate = 1u;
            c->has_terminated = 1u;
            c->is_active = 0u;
            rk_reply(c, k2h, RK_REPLY_TERMINATED, m, step);
        } else if (m.kind == RK_CMD_SNAPSHOT) {
            c->is_active = 0u;
            rk_reply(c, k2h, RK_REPLY_SNAPSHOT_READY, m, step);
        } else if (m.kind == RK_CMD_INJECT) {
            c->is_active = 0u;
            rk_reply(c, k2h, RK_REPLY_INJECT_READY, m, step);
        } else {
            c->last_error = RK_ERR_UNKNOWN_COMMAND;
            c->error_count += 1u;
        }
        if (c->is_active == 0u) break;
    }
    RK_ADVANCE_FENCE();
}

RK_KERNEL void rk_advance(RK_GLOBAL rk_control *c, RK_GLOBAL const rk_message *h2k, RK_GLOBAL rk_message *k2h, const rk_u32 step_done)
{
    if (RK_LEADER) rk_advance_dev(c, h2k, k2h, step_done);
}

#ifndef RK_CUDA
/* ------------------------------------------------------------------------
 * The slab-sweep schedule (temporal blocking on CPU devices) of fdtd_sweep
 * (fdtd3d.cl, which explains it) and tt_sweep (traveltime.cl). Global size:
 * the number of slabs (>= 1, each at least 2*levels planes), local size 1.
 *
 * Work item s sweeps slab s of the interior planes 1 .. nz-2: at sweep
 * position z, level j (step t+j) does plane z-j, by STEP(s, j, p), a
 * statement macro of the caller; in a slab, level j covers only
 * [lo + j, hi - j] (the full range at the walls). Then AFTER(s, slabs), a
 * statement macro run once the slab is swept, a fence, and the planes left
 * out around each boundary b between slabs b and b+1 (level j: the 2j planes
 * nearest it), level by level, by whichever of the two slabs finishes second:
 * sync[b] counts the slabs beside boundary b that are done (the runtime
 * zeroes sync before every launch). No work item ever waits for another.
 */
#define RK_SLAB_SWEEP(nz, levels, sync, STEP, AFTER)                                                    \
    do {                                                                                                \
        const int rk_s = (int)get_global_id(0);                                                         \
        const int rk_slabs = (int)get_global_size(0);                                                   \
        const int rk_planes = (nz) - 2;                                                                 \
        const int rk_lo = 1 + rk_s * rk_planes / rk_slabs;                                              \
        const int rk_hi = (rk_s + 1) * rk_planes / rk_slabs; /* inclusive */                            \
        /* level j (step t+j) covers [lo + j, hi - j] of this slab; at a wall, no shrink */              \
        const int rk_shrink_lo = (rk_s == 0) ? 0 : 1;                                                   \
        const int rk_shrink_hi = (rk_s == rk_slabs - 1) ? 0 : 1;                                        \
        for (int rk_z = rk_lo; rk_z <= rk_hi + (levels) - 1; ++rk_z) {                                  \
            for (int rk_j = 0; rk_j < (levels); ++rk_j) {                                               \
                const int rk_p = rk_z - rk_j;                                                           \
                if (rk_p >= rk_lo + rk_j * rk_shrink_lo && rk_p <= rk_hi - rk_j * rk_shrink_hi) {       \
                    STEP(rk_s, rk_j, rk_p);                                                             \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        AFTER(rk_s, rk_slabs);                                                                          \
        mem_fence(CLK_GLOBAL_MEM_FENCE);                                                                \
        /* boundary b: levels 1.. on the planes neither slab could do; the second slab to finish */    \
        for (int rk_side = 0; rk_side < 2; ++rk_side) {                                                 \
            const int rk_b = rk_side == 0 ? rk_s - 1 : rk_s;                                            \
            if (rk_b < 0 || rk_b >= rk_slabs - 1 || atomic_inc(&(sync)[rk_b]) != 1u)                    \
                continue;                                                                               \
            mem_fence(CLK_GLOBAL_MEM_FENCE);                                                            \
            const int rk_top = rk_side == 0 ? rk_lo - 1 : rk_hi; /* last plane of slab b */             \
            for (int rk_j = 1; rk_j < (levels); ++rk_j)                                                 \
                for (int rk_p = rk_top - rk_j + 1; rk_p <= rk_top + rk_j; ++rk_p) {                     \
                    STEP(rk_s, rk_j, rk_p);                                                             \
                }                                                                                       \
        }                                                                                               \
    } while (0)

/* An AFTER for RK_SLAB_SWEEP with nothing to do. */
#define RK_SLAB_NOTHING(s, slabs) (void)0
#endif /* !RK_CUDA */
