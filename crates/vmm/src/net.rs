//! A VM's virtio-net NICs from its configuration: the TAP opened (in its namespace) and
//! the rate limits set before the device goes on the bus.
use ray_api::net::NetConfig;
use ray_devices::rate::RateLimiter;
use ray_devices::virtio::net::Net;
use ray_devices::virtio::tap;

/// The NIC of `config`. A migration target or restore (`restoring`) starts with its TAP
/// queue detached: the source may still hold the same TAP, and packets should reach
/// whichever VM runs.
pub fn device(config: &NetConfig, restoring: bool) -> Result<Net, String> {
    config.validate()?;
    // A jailed VMM with a network namespace of its own (a migration target, or NICs in
    // several namespaces): its keeper opens the TAP where it is.
    let file = match crate::jailed::taps_from_keeper() {
        true => ray_outside::open_tap(&config.tap, config.netns.as_deref())
            .map_err(|e| format!("cannot open TAP {}: {e}", config.tap))?,
        false => tap::open(&config.tap, config.netns.as_deref())?,
    };
    let mut attached = true;
    if restoring && tap::set_attached(&file, false).is_ok() {
        attached = false;
    }
    on_tap(config, file, attached)
}

/// The NIC of `config` on a TAP opened already (a vhost-user back end keeps one open
/// across its front ends and gives each a clone).
pub fn on_tap(config: &NetConfig, tap: std::fs::File, attached: bool) -> Result<Net, String> {
    let mac = config.mac_address()?;
    let limit = || RateLimiter::new(config.rate_bytes, config.rate_packets);
    Net::new(mac, tap, (limit(), limit()), Some(attached))
        .map_err(|e| format!("cannot create the device's wake-up eventfd: {e}"))
}
