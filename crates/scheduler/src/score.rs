//! Scorers: pure functions of numbers, each returning a score in
//! `0.0..=100.0` where higher is better. The engine combines them with
//! [`Weights`]. Inputs are fractions in `0.0..=1.0` unless noted; inputs
//! outside that range are clamped so the documented range always holds.

/// Weights of the scorers in the engine's total.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// [`best_fit`].
    pub fit: f64,
    /// [`balance`].
    pub balance: f64,
    /// [`soft_anti_affinity`].
    pub soft_anti_affinity: f64,
    /// [`numa_locality`].
    pub numa: f64,
    /// [`strand`].
    pub strand: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            fit: 1.0,
            balance: 4.0,
            soft_anti_affinity: 10.0,
            numa: 1.0,
            strand: 8.0,
        }
    }
}

fn clamp01(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// Best fit on the dominant resource. `leftover` is the free fraction of
/// the host's dominant resource that would remain after placing the VM.
/// Range 0..=100: 100 = host exactly full, 0 = host still empty.
pub fn best_fit(leftover: f64) -> f64 {
    100.0 * (1.0 - clamp01(leftover))
}

/// Least allocated (spread): mean free fraction of vCPU and memory after
/// placement. Range 0..=100: 100 = host still empty.
pub fn least_allocated(free_cpu: f64, free_mem: f64) -> f64 {
    100.0 * (clamp01(free_cpu) + clamp01(free_mem)) / 2.0
}

/// Balanced allocation: how close the host's vCPU and memory utilization
/// stay after placement, so neither resource is stranded by the other.
/// Range 0..=100: 100 = equal utilization.
pub fn balance(used_cpu: f64, used_mem: f64) -> f64 {
    100.0 * (1.0 - (clamp01(used_cpu) - clamp01(used_mem)).abs())
}

/// Soft anti-affinity: `members` of the VM's group already on the host.
/// Range 0..=100: 100 = no member, 50 = one, 100/(1+n) in general.
pub fn soft_anti_affinity(members: u32) -> f64 {
    100.0 / (1.0 + f64::from(members))
}

/// NUMA locality for non-strict VMs: 100 if some node could hold the whole
/// VM (better memory locality), else 0. Range {0, 100}.
pub fn numa_locality(fits_one_node: bool) -> f64 {
    if fits_one_node {
        100.0
    } else {
        0.0
    }
}

/// Stranding: after placement, if one resource is left below what the
/// smallest VM seen needs (`exhausted`), the host's other free resources
/// are stranded. `stranded` is that free fraction (mean of vCPU and memory
/// free fractions) when exhausted, ignored otherwise.
/// Range 0..=100: 100 = nothing stranded, 0 = the whole host stranded.
pub fn strand(exhausted: bool, stranded: f64) -> f64 {
    if exhausted {
        100.0 * (1.0 - clamp01(stranded))
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_table() {
        for (leftover, want) in [
            (0.0, 100.0),
            (1.0, 0.0),
            (0.25, 75.0),
            (-1.0, 100.0),
            (2.0, 0.0),
            (f64::NAN, 100.0),
        ] {
            assert_eq!(best_fit(leftover), want, "leftover {leftover}");
        }
    }

    #[test]
    fn least_allocated_table() {
        for (c, m, want) in [
            (1.0, 1.0, 100.0),
            (0.0, 0.0, 0.0),
            (0.5, 1.0, 75.0),
            (3.0, -3.0, 50.0),
        ] {
            assert_eq!(least_allocated(c, m), want, "cpu {c} mem {m}");
        }
    }

    #[test]
    fn balance_table() {
        for (c, m, want) in [
            (0.5, 0.5, 100.0),
            (1.0, 0.0, 0.0),
            (0.75, 0.25, 50.0),
            (2.0, 1.0, 100.0),
        ] {
            assert_eq!(balance(c, m), want, "cpu {c} mem {m}");
        }
    }

    #[test]
    fn soft_anti_affinity_table() {
        for (n, want) in [(0, 100.0), (1, 50.0), (3, 25.0)] {
            assert_eq!(soft_anti_affinity(n), want, "members {n}");
        }
    }

    #[test]
    fn strand_table() {
        for (ex, frac, want) in [
            (false, 0.9, 100.0),
            (true, 0.0, 100.0),
            (true, 0.25, 75.0),
            (true, 1.0, 0.0),
            (true, 7.0, 0.0),
        ] {
            assert_eq!(strand(ex, frac), want, "exhausted {ex} stranded {frac}");
        }
    }

    #[test]
    fn numa_table() {
        assert_eq!(numa_locality(true), 100.0);
        assert_eq!(numa_locality(false), 0.0);
    }

    #[test]
    fn ranges_hold_on_a_grid() {
        for i in -4..=14 {
            let x = f64::from(i) / 10.0;
            for s in [best_fit(x), least_allocated(x, 1.0 - x), balance(x, 0.3)] {
                assert!((0.0..=100.0).contains(&s), "{s} out of range at {x}");
            }
        }
    }
}
