//! Where everything lives in the store. One function per key, so the layout is in one
//! place (README "Cluster control plane" has the same table with sizes and write rates).
//!
//! ```text
//! /ray/hosts/<host>/alive        agent, under its lease   who runs the agent; gone = lease lapsed
//! /ray/hosts/<host>/status       agent, on change         inventory, health, state, load
//! /ray/hosts/<host>/spec         operator, controller     role, pool, cordon, drain request
//! /ray/hosts/<host>/vms/<vm>     controller               assignment: run <vm> here, epoch E
//! /ray/vms/<vm>/spec             operator                 what the VM is (size, pool, group, HA)
//! /ray/vms/<vm>/token            controller, agent (CAS)  run token: the one host allowed to run it
//! /ray/vms/<vm>/observed         agent, on change         state on its host, last checkpoint
//! /ray/hosts/<host>/incoming/<vm> controller              prepare a receiver for <vm> (migration)
//! /ray/hosts/<host>/outgoing/<vm> controller              send <vm> to a waiting receiver
//! /ray/vms/<vm>/migrate          operator                 a migration asked for (or its abort)
//! /ray/vms/<vm>/receiver         target agent             the receiver: address, progress, outcome
//! /ray/vms/<vm>/sender           source agent             the sender: progress, outcome
//! /ray/ops/<op>                  controller               an operation, recorded before it acts
//! /ray/log/<revision-ordered id> controller               decision log entry
//! /ray/controller/leader         controllers              leader election
//! ```
//!
//! An agent watches one prefix, its own `/ray/hosts/<host>/`, so it sees its assignments
//! and its spec; controllers watch `/ray/hosts/` and `/ray/vms/`.

pub const ROOT: &str = "/ray/";
pub const HOSTS: &str = "/ray/hosts/";
pub const VMS: &str = "/ray/vms/";
pub const OPS: &str = "/ray/ops/";
pub const LOG: &str = "/ray/log/";
pub const LEADER: &str = "/ray/controller/leader";

/// The prefix an agent watches.
pub fn host(host: &str) -> String {
    format!("{HOSTS}{host}/")
}

pub fn host_alive(host: &str) -> String {
    format!("{HOSTS}{host}/alive")
}

pub fn host_status(host: &str) -> String {
    format!("{HOSTS}{host}/status")
}

pub fn host_spec(host: &str) -> String {
    format!("{HOSTS}{host}/spec")
}

/// The prefix of a host's assignments.
pub fn host_vms(host: &str) -> String {
    format!("{HOSTS}{host}/vms/")
}

pub fn assignment(host: &str, vm: &str) -> String {
    format!("{HOSTS}{host}/vms/{vm}")
}

pub fn vm_spec(vm: &str) -> String {
    format!("{VMS}{vm}/spec")
}

pub fn run_token(vm: &str) -> String {
    format!("{VMS}{vm}/token")
}

pub fn vm_observed(vm: &str) -> String {
    format!("{VMS}{vm}/observed")
}

pub fn incoming(host: &str, vm: &str) -> String {
    format!("{HOSTS}{host}/incoming/{vm}")
}

pub fn outgoing(host: &str, vm: &str) -> String {
    format!("{HOSTS}{host}/outgoing/{vm}")
}

pub fn migrate_request(vm: &str) -> String {
    format!("{VMS}{vm}/migrate")
}

pub fn receiver(vm: &str) -> String {
    format!("{VMS}{vm}/receiver")
}

pub fn sender(vm: &str) -> String {
    format!("{VMS}{vm}/sender")
}

pub fn op(id: &str) -> String {
    format!("{OPS}{id}")
}

/// A decision log key: the sequence number zero-padded so keys sort in order.
pub fn log(seq: u64) -> String {
    format!("{LOG}{seq:020}")
}

/// What a key under [`HOSTS`] names: `(host, rest)`, e.g. `("h1", "vms/web-1")`.
pub fn split_host_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(HOSTS)?.split_once('/')
}

/// What a key under [`VMS`] names: `(vm, rest)`, e.g. `("web-1", "token")`.
pub fn split_vm_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(VMS)?.split_once('/')
}

/// A host or VM name must be one path segment that reads well in a key: 1-63 letters,
/// digits, '-', '_' or '.', not starting with '-' or '.'.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name '{name}' is not valid: use 1-63 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_keys_split_back() {
        assert_eq!(
            split_host_key(&assignment("h1", "web-1")),
            Some(("h1", "vms/web-1"))
        );
        assert_eq!(split_host_key(&host_alive("h2")), Some(("h2", "alive")));
        assert_eq!(split_host_key(&vm_spec("x")), None);
        assert!(assignment("h1", "a").starts_with(&host_vms("h1")));
        assert!(host_vms("h1").starts_with(&host("h1")));
        // Log keys sort in sequence order.
        assert!(log(9) < log(10) && log(10) < log(u64::MAX));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("host", "node-1.rack_2").is_ok());
        for bad in ["", "a/b", "-x", ".x", "a b", &"x".repeat(64)] {
            let e = check_name("host", bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }
}
