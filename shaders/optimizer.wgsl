// optimizer.wgsl: the optimizer step of one parameter value, the one place RMSprop and SGD are
// written in WGSL. Not a kernel of its own: every kernel that updates parameters includes it (a
// line `//!include optimizer.wgsl`, expanded by the host) and declares the storage arrays it
// writes, `param` (the packed parameter values) and `velocity` (RMSprop's packed velocities).
//
// Flags, bits of the including kernel's `flags` word (the host's `params::optimizer_flags`):
//   RMSPROP: Keras's RMSprop: v = rho v + (1 - rho) g^2; p -= lr g / sqrt(v + eps)
//   SGD:     p -= lr g
// With neither bit set the step does nothing.

const RMSPROP: u32 = 16u;
const SGD: u32 = 32u;

// The step of the value at param[p] (its velocity at velocity[v]) whose gradient is g.
fn optimizer_step(flags: u32, p: u32, v: u32, g: f32, lr: f32, rho: f32, eps: f32) {
    if ((flags & RMSPROP) != 0u) {
        let vel = rho * velocity[v] + (1.0 - rho) * g * g;
        velocity[v] = vel;
        param[p] = param[p] - lr * g / sqrt(vel + eps);
    } else if ((flags & SGD) != 0u) {
        param[p] = param[p] - lr * g;
    }
}
