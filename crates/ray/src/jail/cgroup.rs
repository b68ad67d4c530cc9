//! The cgroup of a jailed VM: `rayvisor/<id>.<hash>` with a memory and a CPU limit, created by
//! the keeper before the VMM exists (the VMM is born in it) and removed after it ends.
//!
//! cgroup v2 is used where its hierarchy has the memory and cpu controllers: the group
//! is `<cgroup2 mount>/rayvisor/<id>.<hash>` (under the root, which alone may enable controllers
//! while it has processes), limited by `memory.max` and `cpu.max`. Hosts whose memory and
//! cpu controllers sit on cgroup v1 hierarchies (older or hybrid set-ups, such as the one
//! the tests run on) get `rayvisor/<id>.<hash>` under the keeper's own group in each of the two,
//! limited by `memory.limit_in_bytes` and `cpu.cfs_quota_us`/`cpu.cfs_period_us`.
use std::path::{Path, PathBuf};

/// Where the memory and cpu controllers are on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The cgroup2 mount point.
    V2(PathBuf),
    /// The keeper's own group in the memory and in the cpu v1 hierarchies.
    V1 { memory: PathBuf, cpu: PathBuf },
}

/// One VM's cgroup, once created.
#[derive(Debug)]
pub struct VmCgroup {
    /// The VM's group directories (one for v2, two for v1).
    dirs: Vec<PathBuf>,
    /// The groups the keeper was in, to go back to before the VM's are removed.
    home: Vec<PathBuf>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("cannot {what} {}: {e}", path.display())
}

impl Hierarchy {
    /// Finds the controllers, from this process's mounts and groups.
    pub fn detect() -> Result<Hierarchy, String> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| io("read", Path::new("/proc/self/mountinfo"), e))?;
        let groups = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| io("read", Path::new("/proc/self/cgroup"), e))?;
        Self::from_tables(&mounts, &groups, |p| std::fs::read_to_string(p).ok())
    }

    /// [`Hierarchy::detect`] from the text of mountinfo and /proc/self/cgroup; `read`
    /// reads a cgroup2 `cgroup.controllers` file.
    fn from_tables(
        mountinfo: &str,
        own: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Result<Hierarchy, String> {
        // mountinfo: id parent major:minor root mountpoint options... - fstype source superoptions
        let mounts: Vec<(&str, &str, &str)> = mountinfo
            .lines()
            .filter_map(|l| {
                let (head, tail) = l.split_once(" - ")?;
                let mountpoint = head.split(' ').nth(4)?;
                let mut tail = tail.split(' ');
                let fstype = tail.next()?;
                let superopts = tail.nth(1).unwrap_or("");
                Some((mountpoint, fstype, superopts))
            })
            .collect();
        if let Some((mp, _, _)) = mounts.iter().find(|(_, t, _)| *t == "cgroup2") {
            let root = PathBuf::from(mp);
            let controllers = read(&root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("cpu") {
                return Ok(Hierarchy::V2(root));
            }
        }
        // /proc/self/cgroup v1 lines: N:controller[,controller]:path
        let v1 = |controller: &str| -> Option<PathBuf> {
            let (mp, _, _) = mounts
                .iter()
                .find(|(_, t, o)| *t == "cgroup" && o.split(',').any(|x| x == controller))?;
            let path = own.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, list, path) = (f.next()?, f.next()?, f.next()?);
                list.split(',').any(|x| x == controller).then_some(path)
            })?;
            Some(Path::new(mp).join(path.trim_start_matches('/')))
        };
        match (v1("memory"), v1("cpu")) {
            (Some(memory), Some(cpu)) => Ok(Hierarchy::V1 { memory, cpu }),
            _ => Err(
                "this host has no cgroup hierarchy with the memory and cpu controllers (cgroup v2 with both enabled, or v1 memory and cpu mounts)"
                    .into(),
            ),
        }
    }

    /// Creates `rayvisor/<name>` ([`group_name`]) with its limits. A group left by an
    /// earlier VM of this name (a keeper that was killed) is reused.
    pub fn create(
        &self,
        name: &str,
        memory_max: u64,
        cpu_quota_us: u64,
    ) -> Result<VmCgroup, String> {
        let write = |dir: &Path, file: &str, value: &str| {
            std::fs::write(dir.join(file), value)
                .map_err(|e| io(&format!("write '{value}' to"), &dir.join(file), e))
        };
        let mkdir = |dir: &Path| match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io("create", dir, e)),
            _ => Ok(()),
        };
        let period = super::CPU_PERIOD_US;
        match self {
            Hierarchy::V2(root) => {
                let parent = root.join("rayvisor");
                write(root, "cgroup.subtree_control", "+memory +cpu")?;
                mkdir(&parent)?;
                write(&parent, "cgroup.subtree_control", "+memory +cpu")?;
                let dir = parent.join(name);
                mkdir(&dir)?;
                let cg = VmCgroup {
                    home: vec![own_v2_dir(root)?],
                    dirs: vec![dir.clone()],
                };
                write(&dir, "memory.max", &memory_max.to_string())?;
                // Guest memory must not leak into swap past the limit either.
                if dir.join("memory.swap.max").exists() {
                    write(&dir, "memory.swap.max", "0")?;
                }
                write(&dir, "cpu.max", &format!("{cpu_quota_us} {period}"))?;
                Ok(cg)
            }
            Hierarchy::V1 { memory, cpu } => {
                let (m, c) = (memory.join("rayvisor"), cpu.join("rayvisor"));
                mkdir(&m)?;
                mkdir(&c)?;
                let (m, c) = (m.join(name), c.join(name));
                mkdir(&m)?;
                mkdir(&c)?;
                let cg = VmCgroup {
                    home: vec![memory.clone(), cpu.clone()],
                    dirs: vec![m.clone(), c.clone()],
                };
                write(&m, "memory.limit_in_bytes", &memory_max.to_string())?;
                write(&c, "cpu.cfs_period_us", &period.to_string())?;
                write(&c, "cpu.cfs_quota_us", &cpu_quota_us.to_string())?;
                Ok(cg)
            }
        }
    }
}

/// The cgroup name of the VM `id` whose directory is `vm_dir`: the id and a hash of the
/// directory, so that two runtime directories on one host (a migration between them: the
/// same id at both ends) never share a group and its limits.
pub fn group_name(id: &str, vm_dir: &Path) -> String {
    // FNV-1a: stable across builds.
    let hash = vm_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    format!("{id}.{:08x}", hash as u32)
}

/// The keeper's own v2 group (to return to).
fn own_v2_dir(root: &Path) -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| io("read", Path::new("/proc/self/cgroup"), e))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 group")?;
    Ok(root.join(path.trim_start_matches('/')))
}

impl VmCgroup {
    /// Moves this process into the VM's group (its children are born there).
    pub fn enter(&self) -> Result<(), String> {
        self.move_to(&self.dirs)
    }

    fn move_to(&self, dirs: &[PathBuf]) -> Result<(), String> {
        let pid = std::process::id().to_string();
        for d in dirs {
            let procs = d.join("cgroup.procs");
            std::fs::write(&procs, &pid).map_err(|e| io("write to", &procs, e))?;
        }
        Ok(())
    }

    /// The VM's group directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Leaves the VM's group and removes it (the VMM has ended, so it is empty once this
    /// process is out; the kernel may take a moment to let go of its last task).
    pub fn remove(self) -> Result<(), String> {
        self.move_to(&self.home)?;
        for d in &self.dirs {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => return Err(io("remove", d, e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_id_in_two_runtime_directories_gets_two_groups() {
        let a = group_name("vm-1", Path::new("/run/a/vms/vm-1"));
        let b = group_name("vm-1", Path::new("/run/b/vms/vm-1"));
        assert!(a.starts_with("vm-1.") && b.starts_with("vm-1."), "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(
            a,
            group_name("vm-1", Path::new("/run/a/vms/vm-1")),
            "stable"
        );
    }

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";

    #[test]
    fn v1_controllers_are_found_under_the_own_group() {
        let own = "4:memory:/outer/x\n2:cpu,cpuacct:/\n0::/\n";
        let h = Hierarchy::from_tables(HYBRID, own, |_| Some("hugetlb\n".into())).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1 {
                memory: "/sys/fs/cgroup/memory/outer/x".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
            }
        );
    }

    /// The files each hierarchy's limits go to, written into a plain directory standing
    /// in for the cgroup file system (this host has its controllers on v1).
    #[test]
    fn limits_go_to_each_hierarchys_files() {
        let tmp = std::env::temp_dir().join(format!("ray-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        // v2: the VMM's process will enter rayvisor/<id> under the mount (the keeper's own
        // group is "/" there, being the fake root).
        let cg = Hierarchy::V2(tmp.join("v2")).create("vm-a", 300 << 20, 200_000);
        assert!(cg.is_err(), "the mount must exist: {cg:?}");
        std::fs::create_dir_all(tmp.join("v2")).unwrap();
        let cg = Hierarchy::V2(tmp.join("v2"))
            .create("vm-a", 300 << 20, 200_000)
            .unwrap();
        let dir = tmp.join("v2/rayvisor/vm-a");
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        assert_eq!(read(tmp.join("v2/cgroup.subtree_control")), "+memory +cpu");
        assert_eq!(
            read(tmp.join("v2/rayvisor/cgroup.subtree_control")),
            "+memory +cpu"
        );
        assert_eq!(read(dir.join("memory.max")), (300u64 << 20).to_string());
        assert_eq!(read(dir.join("cpu.max")), "200000 100000");
        cg.enter().unwrap();
        assert_eq!(
            read(dir.join("cgroup.procs")),
            std::process::id().to_string()
        );
        // v1: one group per controller, under the keeper's own.
        let (m, c) = (tmp.join("memory/outer"), tmp.join("cpu"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::create_dir_all(&c).unwrap();
        let v1 = Hierarchy::V1 {
            memory: m.clone(),
            cpu: c.clone(),
        };
        let cg = v1.create("vm-b", 1 << 30, 500_000).unwrap();
        let (md, cd) = (m.join("rayvisor/vm-b"), c.join("rayvisor/vm-b"));
        assert_eq!(cg.dirs(), [md.clone(), cd.clone()]);
        assert_eq!(
            read(md.join("memory.limit_in_bytes")),
            (1u64 << 30).to_string()
        );
        assert_eq!(read(cd.join("cpu.cfs_quota_us")), "500000");
        assert_eq!(read(cd.join("cpu.cfs_period_us")), "100000");
        // A group an earlier keeper left is taken again.
        assert!(v1.create("vm-b", 1 << 30, 500_000).is_ok());
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn v2_is_preferred_when_it_has_both_controllers() {
        let mounts = "31 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let h = Hierarchy::from_tables(mounts, "0::/user.slice\n", |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup/cgroup.controllers"));
            Some("cpuset cpu io memory pids\n".into())
        })
        .unwrap();
        assert_eq!(h, Hierarchy::V2("/sys/fs/cgroup".into()));
        let e = Hierarchy::from_tables(mounts, "0::/\n", |_| Some("pids\n".into())).unwrap_err();
        assert!(e.contains("memory and cpu"), "{e}");
    }
}
