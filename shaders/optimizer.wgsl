// optimizer.wgsl: the optimizer step of one parameter value, the one place the optimizers are
// written in WGSL, as the same sequence of f32 operations as `reference::optimizer_one`. Not a
// kernel of its own: every kernel that updates parameters includes it (a line
// `//!include optimizer.wgsl`, expanded by the host), reads a value and the moments its flags
// use, calls `optimizer_step` and writes back what changed.
//
// Flags, bits of the including kernel's `flags` word (the host's `params::optimizer_flags`):
//   RMSPROP:  Keras's RMSprop: v = rho v + (1 - rho) g^2; p -= lr g / sqrt(v + eps)
//   SGD:      p -= lr g
//   MOMENTUM: SGD with momentum mu: m = mu m + g; p -= lr m (with NESTEROV: p -= lr (g + mu m))
//   ADAM:     PyTorch's Adam (AdamW with decay > 0): p -= decay p; m = b1 m + (1 - b1) g;
//             v = b2 v + (1 - b2) g^2; p -= adam_step m / (sqrt(v) adam_norm + eps)
// With none of them set the step does nothing. Before any of them, g += l2 p when l2 != 0.
// The step's scalars (`optim::StepScalars`, per step of the run) come as a vec4:
// (lr, adam_step, adam_norm, decay).

const RMSPROP: u32 = 16u;
const SGD: u32 = 32u;
const MOMENTUM: u32 = 128u;
const NESTEROV: u32 = 256u;
const ADAM: u32 = 512u;

// The optimizer's constant hyper-parameters.
struct Hyper {
    rho: f32,
    eps: f32,
    beta1: f32,
    beta2: f32,
    mu: f32,
    l2: f32,
}

// A parameter value and its second (v) and first (m) moments.
struct Moments {
    p: f32,
    v: f32,
    m: f32,
}

fn steps_at_all(flags: u32) -> bool {
    return (flags & (RMSPROP | SGD | MOMENTUM | ADAM)) != 0u;
}

fn uses_velocity(flags: u32) -> bool {
    return (flags & (RMSPROP | ADAM)) != 0u;
}

fn uses_momentum(flags: u32) -> bool {
    return (flags & (MOMENTUM | ADAM)) != 0u;
}

// The state after one step from `s` with gradient `g_in` and step scalars `k`.
fn optimizer_step(flags: u32, s: Moments, g_in: f32, k: vec4<f32>, h: Hyper) -> Moments {
    var out = s;
    var g = g_in;
    if (h.l2 != 0.0) {
        g = g + h.l2 * s.p;
    }
    if ((flags & RMSPROP) != 0u) {
        out.v = h.rho * s.v + (1.0 - h.rho) * g * g;
        out.p = s.p - k.x * g / sqrt(out.v + h.eps);
    } else if ((flags & ADAM) != 0u) {
        let p = s.p - k.w * s.p;
        out.m = h.beta1 * s.m + (1.0 - h.beta1) * g;
        out.v = h.beta2 * s.v + (1.0 - h.beta2) * g * g;
        out.p = p - k.y * out.m / (sqrt(out.v) * k.z + h.eps);
    } else if ((flags & MOMENTUM) != 0u) {
        out.m = h.mu * s.m + g;
        var d = out.m;
        if ((flags & NESTEROV) != 0u) {
            d = g + h.mu * out.m;
        }
        out.p = s.p - k.x * d;
    } else if ((flags & SGD) != 0u) {
        out.p = s.p - k.x * g;
    }
    return out;
}
