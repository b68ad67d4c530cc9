//! The keeper: `ray vmm --jail`, still root, sets up what must exist before the VMM
//! (cgroup, file ownership), clones the VMM into its namespaces, waits for it and cleans
//! up after it. Its own part is small and runs no guest-facing code.
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::cgroup::{Hierarchy, VmCgroup};
use super::outside::Keeper;
use super::taps::{self, MadeTaps};
use super::{inside, NetPlace, Plan, ROOT_DIR};

/// The namespaces of a jailed VMM (and a network namespace of its own without NICs).
const NAMESPACES: libc::c_int =
    libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

/// Stop signals the keeper passes on to the VMM.
const FORWARDED: &[libc::c_int] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Hands the VM's directory, and what an earlier VM of this id left in it, to the VM's uid
/// (they stay its own). Its disks keep their owners: the keeper opens them for it.
fn give_vm_dir(plan: &Plan, vm_dir: &Path) -> Result<(), String> {
    let chown = |p: &Path| {
        std::os::unix::fs::lchown(p, Some(plan.uid), Some(plan.gid))
            .map_err(|e| format!("cannot hand {} to uid {}: {e}", p.display(), plan.uid))
    };
    chown(vm_dir)?;
    for e in
        std::fs::read_dir(vm_dir).map_err(|e| format!("cannot read {}: {e}", vm_dir.display()))?
    {
        let path = e.map_err(|e| e.to_string())?.path();
        if !path.ends_with(ROOT_DIR) {
            chown(&path)?;
        }
    }
    Ok(())
}

/// Directories lent to the VM's uid while it runs ([`Plan::lend`]).
struct Lent(Vec<super::acl::Lent>);

impl Lent {
    fn lend(plan: &Plan) -> Result<Lent, String> {
        let mut lent = Vec::new();
        for dir in &plan.lend {
            lent.push(super::acl::lend(dir, plan.uid)?);
        }
        Ok(Lent(lent))
    }

    /// Takes the loans back; what the VM's uid made in each directory (copied disks)
    /// goes to the directory's owner.
    fn take_back(self, plan: &Plan) {
        drop(self.0);
        for dir in &plan.lend {
            let Ok(owner) = std::fs::metadata(dir) else {
                continue;
            };
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.uid() == plan.uid) {
                    if let Err(e) =
                        std::os::unix::fs::lchown(&path, Some(owner.uid()), Some(owner.gid()))
                    {
                        tracing::warn!(
                            "cannot give {} to the owner of {}: {e}",
                            path.display(),
                            dir.display()
                        );
                    }
                }
            }
        }
    }
}

/// Blocks the forwarded signals and SIGCHLD in this (single) thread; returns the set and
/// the old mask.
fn block_forwarded() -> (libc::sigset_t, libc::sigset_t) {
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise; the mask only
    // changes for this thread, the process's only one.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        // SIGCHLD too: it wakes the keeper at once when the VMM ends.
        for &s in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        (set, old)
    }
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |t| t.count())
}

/// Jails this process as `plan` says. Returns (`Ok`) only in the jailed VMM, which then
/// runs the VMM; the keeper exits here with the VMM's status once it is cleaned up.
///
/// `handed` are descriptors the VMM inherits for itself (a migration target's listener,
/// key file and slot): the keeper closes its copies once the VMM has them.
pub fn jail(
    plan: &Plan,
    id: &str,
    vm_dir: &Path,
    lock_fd: Option<RawFd>,
    handed: &[RawFd],
) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("ray vmm --jail must run as root".into());
    }
    // The clone copies only the calling thread: no other may hold a lock it needs.
    if threads() != 1 {
        return Err(format!(
            "ray vmm --jail must start single-threaded (it has {} threads)",
            threads()
        ));
    }
    let root = vm_dir.join(ROOT_DIR);
    match std::fs::create_dir(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("cannot create {}: {e}", root.display()))
        }
        _ => {}
    }
    if let Some(dir) = &plan.encode_slots {
        ray_display::encode::make_host_slots(dir).map_err(|e| e.to_string())?;
    }
    let cgroup = Hierarchy::detect()?.create(
        &super::cgroup::group_name(id, vm_dir),
        plan.memory_max,
        plan.cpu_quota_us,
    )?;
    // The loans first: removing the cgroup may wait for the kernel to let go of the
    // VMM, and a new VM may want them meanwhile.
    let undo = |cgroup: VmCgroup, lent: Option<Lent>, made: Option<MadeTaps>| {
        if let Some(lent) = lent {
            lent.take_back(plan);
        }
        if let Some(m) = made {
            m.remove();
        }
        if let Err(e) = cgroup.remove() {
            tracing::warn!("{e}");
        }
        let _ = std::fs::remove_dir(&root);
    };
    if let Err(e) = give_vm_dir(plan, vm_dir).and_then(|()| cgroup.enter()) {
        undo(cgroup, None, None);
        return Err(e);
    }
    let given = match Lent::lend(plan) {
        Ok(l) => l,
        Err(e) => {
            undo(cgroup, None, None);
            return Err(e);
        }
    };
    let netns = match &plan.net {
        NetPlace::Named(path) => taps::enter_netns(path),
        NetPlace::Host | NetPlace::Private => Ok(()),
    };
    let made = match netns.and_then(|_| taps::make_missing(&plan.taps, plan.uid)) {
        Ok(m) => m,
        Err(e) => {
            undo(cgroup, Some(given), None);
            return Err(e);
        }
    };
    let flags = match plan.net {
        NetPlace::Private => NAMESPACES | libc::CLONE_NEWNET,
        NetPlace::Host | NetPlace::Named(_) => NAMESPACES,
    };
    // What the VMM asks for outside its jail comes over this pair ([`super::outside`]).
    let (keeper_end, vmm_end) = match std::os::unix::net::UnixDatagram::pair() {
        Ok(p) => p,
        Err(e) => {
            undo(cgroup, Some(given), Some(made));
            return Err(format!(
                "cannot make the jailed VMM's socket to its keeper: {e}"
            ));
        }
    };
    let (signals, old_mask) = block_forwarded();
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack: the child runs on a copy of
    // this stack) of a single-threaded process (checked above), with SIGCHLD to the parent.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_long::from(flags | libc::SIGCHLD),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        undo(cgroup, Some(given), Some(made));
        return Err(format!("cannot clone the VMM into new namespaces: {e}"));
    }
    if pid == 0 {
        // The jailed VMM: the keeper's death ends it too.
        // SAFETY: restores the mask this thread had; prctl takes plain integers.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        }
        drop(keeper_end);
        // Its own cgroup's files, read-only: the VMM can read its limits (GET /vm/jail).
        let mut seen = plan.clone();
        seen.binds.extend(cgroup.dirs().iter().map(|d| super::Bind {
            path: d.clone(),
            writable: false,
            device: false,
        }));
        return become_vmm(&seen, id, vm_dir, vmm_end);
    }
    drop(vmm_end);
    let mut keeper = Keeper::new(keeper_end, &plan.outside, (plan.uid, plan.gid));
    let mut socket = plan
        .listen_socket
        .as_deref()
        .and_then(|path| handed.first().and_then(|&fd| SocketWatch::new(path, fd)));
    for &fd in handed {
        // SAFETY: closes this process's copy of a descriptor it inherited for the VMM,
        // which holds its own (a listener or a lock held here would outlive the VMM's
        // use of it); nothing in the keeper uses it.
        unsafe { libc::close(fd) };
    }
    if let Some(fd) = lock_fd {
        name_owner(fd, pid as u32);
    }
    let status = wait_forwarding(pid as libc::pid_t, &signals, &mut keeper, &mut || {
        if socket.as_ref().is_some_and(SocketWatch::let_go) {
            socket = None;
        }
    });
    if let Some(s) = socket {
        s.remove();
    }
    undo(cgroup, Some(given), Some(made));
    std::process::exit(status);
}

/// Names the VMM (its host pid) in the VM directory's lock file, inherited as `fd`, for
/// whoever is refused the lock meanwhile (see `ray_vmm::vmlock`); the VMM names itself
/// again once it runs.
fn name_owner(fd: RawFd, pid: u32) {
    use std::os::unix::fs::FileExt;
    // SAFETY: `fd` is the lock file this process inherited and keeps open for its life;
    // ManuallyDrop leaves it open.
    let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let _ = file.set_len(0);
    let _ = file.write_all_at(format!("{pid}\n").as_bytes(), 0);
}

/// The jailed child's set-up, before it runs the VMM.
fn become_vmm(
    plan: &Plan,
    id: &str,
    vm_dir: &Path,
    keeper: std::os::unix::net::UnixDatagram,
) -> Result<(), String> {
    let host_pid = inside::host_pid()?;
    inside::enter_root(plan, vm_dir)?;
    inside::set_hostname(id)?;
    inside::drop_privileges(plan)?;
    ray_outside::set_keeper(keeper)
        .map_err(|e| format!("cannot keep the socket to the keeper: {e}"))?;
    ray_vmm::jailed::set(ray_vmm::jailed::Jailed {
        host_pid,
        writable: std::iter::once(vm_dir.to_path_buf())
            .chain(plan.lend.iter().cloned())
            .collect(),
        own_network: plan.net == NetPlace::Private,
        shared_dirs: plan.outside.shared_dirs.clone(),
    });
    Ok(())
}

/// A migration target's Unix listening socket, which `ray` bound outside the jail: its
/// file goes once no process holds the socket (the VMM drops it after the source
/// connected), as an unjailed target removes it itself.
struct SocketWatch {
    path: PathBuf,
    /// (device, inode) of the socket's file.
    file: (u64, u64),
    /// The socket's own inode (`/proc/net/unix` lists it while it is open).
    socket: u64,
}

impl SocketWatch {
    fn new(path: &Path, fd: RawFd) -> Option<SocketWatch> {
        // SAFETY: `fd` is the listener this process inherited; borrowed for the call.
        let file = std::fs::File::from(
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .ok()?,
        );
        let socket = file.metadata().ok()?.ino();
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(SocketWatch {
            path: path.to_path_buf(),
            file: (m.dev(), m.ino()),
            socket,
        })
    }

    /// Whether the socket is closed everywhere now (then its file is removed).
    fn let_go(&self) -> bool {
        let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
            return false;
        };
        let open = table
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(6).and_then(|i| i.parse().ok()) == Some(self.socket));
        if !open {
            self.remove();
        }
        !open
    }

    /// Removes the socket's file if it is still the one `ray` bound.
    fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Waits for the VMM, passing on stop signals, answering what it asks for outside its
/// jail (`keeper`) and calling `tick` between waits; returns its exit code (128 + signal
/// when a signal ended it, as a shell reports it).
fn wait_forwarding(
    pid: libc::pid_t,
    signals: &libc::sigset_t,
    keeper: &mut Keeper,
    tick_fn: &mut dyn FnMut(),
) -> i32 {
    use std::os::fd::AsRawFd;
    // The blocked signals, readable as a descriptor: one poll waits for them and for the
    // VMM's requests.
    // SAFETY: a valid signal set; the result is checked.
    let sfd = unsafe { libc::signalfd(-1, signals, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if sfd < 0 {
        tracing::warn!(
            "no signalfd ({}): stop signals reach the VMM only when it ends",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a descriptor just made and owned by nothing else.
    let sfd = (sfd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(sfd) });
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
            continue;
        }
        if r < 0 {
            return 1;
        }
        tick_fn();
        let mut fds = [
            libc::pollfd {
                fd: keeper.socket().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call's duration.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
        if fds[0].revents & libc::POLLIN != 0 {
            keeper.serve();
        }
        if let Some(sfd) = &sfd {
            // SAFETY: signalfd_siginfo is plain data, read whole from the signalfd.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads at most `size` bytes into `info`, which is that big.
            while unsafe { libc::read(sfd.as_raw_fd(), (&raw mut info).cast(), size) }
                == size as isize
            {
                let sig = info.ssi_signo as libc::c_int;
                if FORWARDED.contains(&sig) {
                    // SAFETY: signals our own child.
                    unsafe { libc::kill(pid, sig) };
                }
            }
        }
    }
}
