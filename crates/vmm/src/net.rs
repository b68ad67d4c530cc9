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
    let mac = config.mac_address()?;
    let file = tap::open(&config.tap, config.netns.as_deref())?;
    let mut attached = true;
    if restoring && tap::set_attached(&file, false).is_ok() {
        attached = false;
    }
    let limit = || RateLimiter::new(config.rate_bytes, config.rate_packets);
    Net::new(mac, file, (limit(), limit()), Some(attached))
        .map_err(|e| format!("cannot create the device's wake-up eventfd: {e}"))
}
