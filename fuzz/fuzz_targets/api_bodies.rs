//! Request bodies of the VM API as a client may send them: the first input byte picks the
//! endpoint's body type, the rest is the body. Each is decoded as the server decodes it
//! (strict JSON, unknown fields refused) and then checked the way the VMM checks it before
//! acting. Every body must be refused with an error or accepted; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_api::vmm::{ConsoleInput, MigrateRequest, SnapshotRequest, StopRequest, VmConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(c) = serde_json::from_slice::<VmConfig>(body) {
                let _ = ray_vmm::config::validate_shape(&c, 1 << 34);
            }
        }
        1 => {
            if let Ok(m) = serde_json::from_slice::<MigrateRequest>(body) {
                let _ = ray_migration::Endpoint::parse(&m.to);
            }
        }
        2 => {
            let _ = serde_json::from_slice::<SnapshotRequest>(body);
        }
        3 => {
            let _ = serde_json::from_slice::<StopRequest>(body);
        }
        _ => {
            let _ = serde_json::from_slice::<ConsoleInput>(body);
        }
    }
});
