//! Network namespaces for tests and benchmarks: a namespace of their own with a TAP for
//! a VM (or a veth pair to a second namespace, for a host-to-host baseline), removed on
//! drop. Nothing outside the namespaces is touched: the interfaces are created inside.
use std::process::Command;

/// One network namespace (`ip netns add`), deleted on drop with all its interfaces.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// A new namespace `name` (an old one of that name is removed first) with loopback up.
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A multi-queue TAP `tap` with address `cidr` (e.g. 10.0.0.1/24), up.
    pub fn add_tap(&self, tap: &str, cidr: &str) -> anyhow::Result<()> {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap", "multi_queue"])?;
        self.ip(&["addr", "add", cidr, "dev", tap])?;
        self.ip(&["link", "set", tap, "up"])
    }

    /// A veth pair: `here` in this namespace with `cidr_here`, `there` in `other`.
    pub fn add_veth(
        &self,
        here: &str,
        cidr_here: &str,
        other: &Netns,
        there: &str,
        cidr_there: &str,
    ) -> anyhow::Result<()> {
        self.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            &other.name,
        ])?;
        self.ip(&["addr", "add", cidr_here, "dev", here])?;
        self.ip(&["link", "set", here, "up"])?;
        other.ip(&["addr", "add", cidr_there, "dev", there])?;
        other.ip(&["link", "set", there, "up"])
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A command run in this network namespace only (`setns` before `exec`): unlike
    /// `ip netns exec` it keeps the host's mounts, so a `ray agent` there sees the host's
    /// cgroups and jails its VMMs as on a host of its own.
    pub fn enter_command(&self, program: &str) -> anyhow::Result<Command> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path)?;
        let mut c = Command::new(program);
        // SAFETY: setns is async-signal-safe and touches no memory of ours; `ns` lives in
        // the closure, so its descriptor is open in the child until it execs.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(c)
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens stay there).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path)?;
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a namespace descriptor we hold.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::anyhow!(
                    "cannot enter {path}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
