//! A VM's virtio-vsock device from its configuration: the socket path settled against
//! the VM's directory (the default moves with the VM's id, so a restored or migrated VM
//! listens in its own directory).
use std::path::Path;

use ray_api::vmm::DevicesConfig;

/// `devices` with the vsock socket's path made explicit for a VM in `vm_dir`. The VM's
/// configuration keeps what the user gave (none: the default).
pub fn settle(devices: &DevicesConfig, vm_dir: &Path) -> DevicesConfig {
    let mut d = devices.clone();
    if let Some(v) = &mut d.vsock {
        v.socket = Some(v.socket_path(vm_dir).display().to_string());
    }
    d
}
