/* rkkernel runtime for OpenCL: control block, queues, step-boundary kernel.
 *
 * Layout must match rkkernel/control.py (CONTROL_BLOCK_DTYPE, MESSAGE_DTYPE);
 * the control block is the reference runtime's 128-byte ControlBlock, with the
 * step counter and queue capacities in its reserved bytes.
 * The runtime prepends this file to the user's kernel source.
 */
#pragma OPENCL FP_CONTRACT OFF

typedef struct __attribute__((aligned(8))) {
    uint  is_active;
    uint  should_terminate;
    uint  has_terminated;
    uint  _pad1;
    ulong messages_processed;
    ulong messages_in_flight;
    ulong input_head;
    ulong input_tail;
    ulong output_head;
    ulong output_tail;
    uint  input_mask;
    uint  output_mask;
    ulong hlc_physical;
    ulong hlc_logical;
    uint  last_error;
    uint  error_count;
    ulong current_step;
    uint  input_capacity;
    uint  output_capacity;
    uchar _reserved[16];
} rk_control;

typedef struct __attribute__((aligned(8))) {
    uint  kind;
    uint  arg;
    ulong step;
    ulong a;
    ulong b;
} rk_message;

#define RK_CMD_SNAPSHOT 1u
#define RK_CMD_TERMINATE 2u
#define RK_CMD_INJECT 3u
#define RK_REPLY_SNAPSHOT_READY 1u
#define RK_REPLY_TERMINATED 2u
#define RK_REPLY_INJECT_READY 3u
#define RK_ERR_K2H_FULL 1u
#define RK_ERR_UNKNOWN_COMMAND 2u

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

inline void rk_reply(__global rk_control *c, __global rk_message *k2h, const uint kind, const rk_message m, const ulong step)
{
    if (c->output_tail - c->output_head >= (ulong)c->output_mask + 1ul) {
        c->last_error = RK_ERR_K2H_FULL;
        c->error_count += 1u;
        return;
    }
    __global rk_message *slot = &k2h[c->output_tail & (ulong)c->output_mask];
    slot->kind = kind;
    slot->arg = m.arg;
    slot->step = step;
    slot->a = m.a;
    slot->b = m.b;
    c->output_tail += 1ul;
}

/* Step boundary: one work item. step_done = 1 after a step, 0 for the poll
 * that starts a batch. Mirrors rkkernel.control.advance(). */
__kernel void rk_advance(__global rk_control *c, __global const rk_message *h2k, __global rk_message *k2h, const uint step_done)
{
    if (c->is_active == 0u) return;
    if (step_done != 0u) c->current_step += 1ul;
    const ulong step = c->current_step;
    while (c->input_head != c->input_tail) {
        const rk_message m = h2k[c->input_head & (ulong)c->input_mask];
        if (m.step > step) break;
        c->input_head += 1ul;
        c->messages_processed += 1ul;
        c->hlc_logical += 1ul;
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
}
