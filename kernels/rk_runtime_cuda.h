/* rkkernel runtime for CUDA: control block, queues, step-boundary logic.
 * Same layout and semantics as rk_runtime_cl.h and rkkernel/control.py.
 * The runtime prepends this file to the user's kernel source (NVRTC).
 */
typedef unsigned int rk_u32;
typedef unsigned long long rk_u64;

struct __align__(8) rk_control {
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
};

struct __align__(8) rk_message {
    rk_u32 kind;
    rk_u32 arg;
    rk_u64 step;
    rk_u64 a;
    rk_u64 b;
};

#define RK_CMD_SNAPSHOT 1u
#define RK_CMD_TERMINATE 2u
#define RK_CMD_INJECT 3u
#define RK_REPLY_SNAPSHOT_READY 1u
#define RK_REPLY_TERMINATED 2u
#define RK_REPLY_INJECT_READY 3u
#define RK_ERR_K2H_FULL 1u
#define RK_ERR_UNKNOWN_COMMAND 2u

#define RK_BEGIN(ctl) if (((volatile rk_control *)(ctl))->is_active == 0u) return

/* See rk_runtime_cl.h: IEEE arithmetic (built with --ftz=false), stored
 * values with |x| < FLT_MIN become +0.0f. */
__device__ __forceinline__ float rk_ftz(const float x)
{
    const unsigned int u = __float_as_uint(x);
    return __uint_as_float((u & 0x7fffffffu) >= 0x00800000u ? u : 0u);
}

__device__ void rk_reply(volatile rk_control *c, rk_message *k2h, const rk_u32 kind, const rk_message m, const rk_u64 step)
{
    if (c->output_tail - c->output_head >= (rk_u64)c->output_mask + 1ull) {
        c->last_error = RK_ERR_K2H_FULL;
        c->error_count += 1u;
        return;
    }
    rk_message *slot = &k2h[c->output_tail & (rk_u64)c->output_mask];
    slot->kind = kind;
    slot->arg = m.arg;
    slot->step = step;
    slot->a = m.a;
    slot->b = m.b;
    c->output_tail += 1ull;
}

__device__ void rk_advance_dev(rk_control *cc, const rk_message *h2k, rk_message *k2h, const rk_u32 step_done)
{
    volatile rk_control *c = cc;
    if (c->is_active == 0u) return;
    if (step_done != 0u) c->current_step += 1ull;
    const rk_u64 step = c->current_step;
    while (c->input_head != c->input_tail) {
        const rk_message m = h2k[c->input_head & (rk_u64)c->input_mask];
        if (m.step > step) break;
        c->input_head += 1ull;
        c->messages_processed += 1ull;
        c->hlc_logical += 1ull;
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
    __threadfence();
}

extern "C" __global__ void rk_advance(rk_control *c, const rk_message *h2k, rk_message *k2h, const rk_u32 step_done)
{
    if (blockIdx.x == 0 && threadIdx.x == 0) rk_advance_dev(c, h2k, k2h, step_done);
}
