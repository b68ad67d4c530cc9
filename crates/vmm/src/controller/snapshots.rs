//! The controller's snapshots: writing one (full or incremental), restoring one into this
//! VMM, and suspend/resume through the VM's own directory.
use super::*;
use crate::vstate::vm::ShellPrep;
use std::os::fd::AsRawFd;

impl Controller {
    /// Writes a snapshot. A running VM is refused unless `pause` asks to pause it for the
    /// snapshot (and resume it after, whatever the outcome). An incremental snapshot holds
    /// the pages written since this VM's previous snapshot, which becomes its parent. Every
    /// check comes before the pause: a refused request leaves the VM as it was.
    pub(super) fn snapshot(
        &mut self,
        req: SnapshotRequest,
        inbox: &Receiver<Message>,
    ) -> Result<SnapshotInfo, ControllerError> {
        // The store a client handed over (a jailed VMM's root holds only its directory):
        // written through this process's descriptor of it. Held until the write is done.
        let handed = match &req.handoff {
            Some(token) => Some(self.take_handoff(token)?),
            None => None,
        };
        let through = handed
            .as_ref()
            .map(|fd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())));
        let plan = plan_snapshot(
            self.state,
            self.last_snapshot.as_ref(),
            self.config.as_ref(),
            &req,
            through.as_deref(),
        )?;
        let running = self.state == VmState::Running;
        let t_pause = Instant::now();
        if running {
            self.machine()?.pause();
            self.apply(VmAction::Pause, "api:snapshot")?;
        }
        let t_write = Instant::now();
        let result = self.write_snapshot(
            &plan.write_path,
            &plan.config,
            plan.parent.as_deref(),
            req.compress,
            plan.max_snapshots,
            inbox,
        );
        let write_ms = t_write.elapsed().as_secs_f64() * 1e3;
        if running {
            self.machine()?.resume();
            self.apply(VmAction::Resume, "api:snapshot")?;
        }
        let paused_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        let (manifest, _) = result?;
        drop(handed);
        self.last_snapshot = Some((plan.store, plan.id.clone()));
        Ok(SnapshotInfo {
            id: plan.id,
            path: req.path,
            parent: manifest.parent.clone(),
            kind: crate::snapshot::api_kind(manifest.kind),
            compressed: req.compress,
            memory_bytes: manifest.memory_bytes,
            stored_pages: manifest.dirty_pages,
            disk_bytes: manifest.stored_bytes(),
            state_bytes: manifest.files.get("state.bin").map_or(0, |f| f.bytes),
            paused_ms,
            write_ms,
        })
    }

    /// Saves the paused machine and writes it to `path`. An incremental snapshot holds the
    /// pages the snapshot consumer of the dirty log took; if writing fails they go back to
    /// it, so a failed snapshot loses nothing for the next. Afterwards the consumer counts
    /// from this snapshot. Returns the manifest and the pages taken (what the VM owed to
    /// an incremental snapshot on its previous one). Status reads are answered while the
    /// memory is written; other requests wait until it is done.
    pub(super) fn write_snapshot(
        &mut self,
        path: &Path,
        config: &VmConfig,
        parent: Option<&str>,
        compress: bool,
        max_snapshots: usize,
        inbox: &Receiver<Message>,
    ) -> Result<(ray_snapshot::Manifest, Option<DirtyBitmap>), ControllerError> {
        let failed = |e: String| ControllerError::failed(format!("snapshot failed: {e}"));
        let state_now = self.state;
        let machine = self.machine.as_mut().ok_or_else(|| {
            ControllerError::refused(format!("the VM is {state_now} and has no machine"))
        })?;
        let log = self.snapshot_log;
        let taken = match log {
            Some(id) => Some(
                machine
                    .vm
                    .take_dirty(id)
                    .map_err(|e| failed(e.to_string()))?,
            ),
            None => None,
        };
        let give_back = |machine: &Machine, taken: &Option<DirtyBitmap>| {
            if let (Some(id), Some(pages)) = (log, taken) {
                machine.vm.memory.give_back(id, pages);
            }
        };
        let parent = match (parent, &taken) {
            (Some(p), Some(pages)) => Some((p, pages)),
            (Some(_), None) => {
                return Err(failed(
                    "no dirty-page log since the parent snapshot".to_string(),
                ))
            }
            (None, _) => None,
        };
        let state = match machine.save() {
            Ok(s) => s,
            Err(e) => {
                give_back(machine, &taken);
                return Err(failed(e.to_string()));
            }
        };
        let compat = crate::snapshot::compat_tag(
            self.flavour,
            &crate::snapshot::cpu_fingerprint(&machine.vm.kvm),
        );
        let spec = crate::snapshot::NewSnapshotSpec {
            path,
            vm_id: &self.id,
            config,
            compat,
            parent,
            compress,
            max_snapshots,
        };
        let gone = || ControllerError::refused(format!("the VM is {state_now} and has no machine"));
        let (written, deferred) = {
            let this = &*self;
            let machine = this.machine.as_ref().ok_or_else(gone)?;
            let (memory, meter) = (&machine.vm.memory, &this.meter);
            this.answering_reads(inbox, || {
                serde_json::to_vec(&state)
                    .map_err(|e| crate::snapshot::SnapshotError::Invalid(e.to_string()))
                    .and_then(|payload| crate::snapshot::create(&spec, &payload, memory, meter))
            })
        };
        self.deferred.extend(deferred);
        let machine = self.machine.as_mut().ok_or_else(gone)?;
        let manifest = match written {
            Ok(m) => m,
            Err(e) => {
                give_back(machine, &taken);
                return Err(match e {
                    crate::snapshot::SnapshotError::Store(
                        ray_snapshot::StoreError::LimitReached { .. }
                        | ray_snapshot::StoreError::AlreadyExists(_)
                        | ray_snapshot::StoreError::NotFound(_)
                        | ray_snapshot::StoreError::WrongState { .. },
                    ) => ControllerError::refused(format!("snapshot refused: {e}")),
                    e => failed(e.to_string()),
                });
            }
        };
        // From now on, count the pages written since this snapshot.
        if self.snapshot_log.is_none() {
            match machine.vm.add_dirty_consumer("snapshot", None) {
                Ok(id) => self.snapshot_log = Some(id),
                Err(e) => {
                    tracing::warn!("no dirty-page log ({e}); the next snapshot will be full")
                }
            }
        }
        Ok((manifest, taken))
    }

    /// Brings a snapshot back to life in this (new, unconfigured) VMM. `prep`, if given,
    /// is the KVM VM being created meanwhile (started as early as the caller could).
    pub fn restore(
        &mut self,
        path: &Path,
        verify_memory: bool,
        prep: Option<ShellPrep>,
    ) -> Result<(), ControllerError> {
        crate::startup::mark(crate::startup::Mark::RestoreBegin);
        self.check(VmAction::Start)?;
        let config = self.rebuild(path, verify_memory, prep)?;
        self.config = Some(config);
        self.started = Some(Instant::now());
        let id = self.last_snapshot.as_ref().map_or("", |s| s.1.as_str());
        let cause = format!("restore:{id}");
        self.apply(VmAction::Start, &cause)?;
        self.restored
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Builds the machine of the snapshot at `path` and starts its vCPUs. The snapshot
    /// becomes the parent of this VM's next incremental snapshot.
    pub(super) fn rebuild(
        &mut self,
        path: &Path,
        verify_memory: bool,
        prep: Option<ShellPrep>,
    ) -> Result<VmConfig, ControllerError> {
        let bad = |e: crate::snapshot::SnapshotError| {
            ControllerError::invalid(format!("cannot restore {}: {e}", path.display()))
        };
        let failed =
            |e: String| ControllerError::failed(format!("cannot restore {}: {e}", path.display()));
        // KVM's share of the work (the VM, the CPU fingerprint) goes on while the
        // snapshot is read; both are needed before the snapshot's host check.
        let prep = prep.unwrap_or_else(|| ShellPrep::start(self.flavour));
        let (shell, cpu) = prep.finish().map_err(|e| failed(e.to_string()))?;
        let compat = crate::snapshot::compat_tag(self.flavour, &cpu);
        let loaded = crate::snapshot::load(path, &compat).map_err(bad)?;
        crate::startup::mark(crate::startup::Mark::Loaded);
        // A new VMM restoring verifies lazily; resuming a suspended VM checks first, so a
        // damaged image leaves the VM suspended (and this VMM running) instead of failing
        // it midway.
        let verify = match (verify_memory, self.state) {
            (false, _) => crate::snapshot::Verify::No,
            (true, VmState::Created) => crate::snapshot::Verify::Lazy(self.fail_stop(path)),
            (true, _) => crate::snapshot::Verify::Eager,
        };
        let memory = crate::snapshot::memory(&loaded, verify).map_err(bad)?;
        crate::startup::mark(crate::startup::Mark::Mapped);
        let sinks = self.console_sinks()?;
        let inbox = self.vcpu_events.clone();
        let events: EventSink = Arc::new(move |e| {
            let _ = inbox.send(Message::Vcpu(e));
        });
        let mut machine = Machine::restore(
            shell,
            memory,
            &loaded.state,
            &crate::vsock::settle(&loaded.config.devices, &self.paths.dir),
            loaded.config.numa_attribution == ray_api::vmm::NumaAttribution::Ring,
            sinks,
            events,
        )
        .map_err(|e| failed(e.to_string()))?;
        self.numa = crate::numa::place_restored(&machine, &loaded.config);
        self.start_numa_policy(&machine, &loaded.config)?;
        crate::startup::mark(crate::startup::Mark::Running);
        // Pages written from here on are what an incremental snapshot on top holds.
        let owed = self.suspended_owed.take();
        match machine.vm.add_dirty_consumer("snapshot", owed) {
            Ok(id) => {
                self.snapshot_log = Some(id);
                self.last_snapshot = Some((loaded.store.clone(), loaded.id.clone()));
            }
            Err(e) => {
                tracing::warn!("no dirty-page log ({e}); the next snapshot will be full");
                self.snapshot_log = None;
                self.last_snapshot = None;
            }
        }
        self.machine = Some(machine);
        Ok(loaded.config)
    }

    /// What a lazily verified restore does when a block of `snapshot`'s memory fails its
    /// check: the guest has not seen that block and must not run on without it, so the
    /// VMM ends with the VM in state `error` (exit record, audit trail, log). Called on the
    /// fault or fill thread; it does not wait for this (VMM) thread, which may itself be
    /// waiting for the damaged block.
    fn fail_stop(&self, snapshot: &Path) -> ray_memory::lazy::OnDamage {
        let id = self.id.clone();
        let paths = self.paths.clone();
        let started = self.restored.clone();
        let snapshot = snapshot.display().to_string();
        Box::new(move |why| {
            let from = if started.load(std::sync::atomic::Ordering::Acquire) {
                VmState::Running
            } else {
                VmState::Created
            };
            let reason = format!(
                "the memory of snapshot {snapshot} failed its check ({why}); the VMM stopped the VM before anything read that block"
            );
            tracing::error!("{reason}");
            let event = LifecycleEvent {
                time_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                from,
                to: VmState::Error,
                cause: "restore:memory-damaged".into(),
            };
            if let Ok(mut line) = serde_json::to_vec(&event) {
                line.push(b'\n');
                crate::lifecycle::append_synced(&paths.events(), &line);
            }
            let record = crate::ExitRecord {
                id: id.clone(),
                state: VmState::Error,
                reason: Some(reason),
                pid: crate::jailed::host_pid(),
            };
            if let Ok(json) = serde_json::to_vec_pretty(&record) {
                let _ = std::fs::write(paths.exit_record(), json);
            }
            let _ = std::fs::remove_file(paths.socket());
            std::process::exit(1);
        })
    }

    /// Starts checking the rest of a lazily verified restore's memory in the background
    /// (the VMM does so once the restored guest has had its first moments to itself).
    pub fn fill_in_background(&self) {
        if let Some(m) = &self.machine {
            if let Err(e) = m.vm.memory.fill_in_background() {
                // Not fatal: whatever waits for the fill (a snapshot) places the rest.
                tracing::warn!("{e}");
            }
        }
    }

    /// Where a suspended VM keeps its memory and state.
    pub(super) fn suspend_dir(&self) -> PathBuf {
        self.paths.dir.join(crate::snapshot::SUSPEND_DIR)
    }

    /// Suspend: a snapshot to the VM's directory, then the machine and its memory go.
    pub(super) fn suspend(&mut self, inbox: &Receiver<Message>) -> Result<(), ControllerError> {
        self.check(VmAction::Suspend)?;
        let config = self
            .config
            .clone()
            .ok_or_else(|| ControllerError::refused("the VM has no configuration"))?;
        self.machine()?;
        let dir = self.suspend_dir();
        let _ = std::fs::remove_dir_all(&dir);
        let running = self.state == VmState::Running;
        if running {
            self.machine()?.pause();
            self.apply(VmAction::Pause, "api:suspend")?;
        }
        // Paused now: the snapshot is of exactly the state the VM will resume from. If it
        // fails, the VM keeps its memory and is back in the state it was in: nothing is
        // lost.
        let (_, carried) = match self.write_snapshot(&dir, &config, None, false, 1, inbox) {
            Ok(written) => written,
            Err(e) => {
                if running {
                    self.machine()?.resume();
                    self.apply(VmAction::Resume, "api:suspend failed")?;
                }
                return Err(e);
            }
        };
        // The suspend image is not a checkpoint: after resume, the next incremental
        // snapshot still builds on the VM's last one, with every page written since.
        self.suspended_owed = carried;
        self.snapshot_log = None;
        if let Some(mut m) = self.machine.take() {
            m.shutdown();
        }
        self.apply(VmAction::Suspend, "api:suspend")?;
        Ok(())
    }

    /// Resume from Suspended: the suspend snapshot becomes the machine again.
    pub(super) fn resume_suspended(&mut self) -> Result<(), ControllerError> {
        let dir = self.suspend_dir();
        let last = self.last_snapshot.clone();
        let owed = self.suspended_owed.is_some();
        self.rebuild(&dir, true, None)?;
        // The pages owed to the next incremental snapshot went to the rebuilt VM's log.
        self.last_snapshot = if owed && self.snapshot_log.is_some() {
            last
        } else {
            None
        };
        self.apply(VmAction::Resume, "api:resume")?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

/// A snapshot request checked against the VM, ready to carry out.
#[derive(Debug, PartialEq)]
pub(super) struct SnapshotPlan {
    pub path: PathBuf,
    /// Where the VMM writes it: `path`, or the same name in a handed store.
    pub write_path: PathBuf,
    pub store: PathBuf,
    pub id: String,
    /// The parent's id, for an incremental snapshot.
    pub parent: Option<String>,
    pub config: VmConfig,
    pub max_snapshots: usize,
}

/// Checks a snapshot request against the VM's state, its last snapshot and its
/// configuration, with no side effect: everything that can refuse it refuses here.
pub(super) fn plan_snapshot(
    state: VmState,
    last: Option<&(PathBuf, String)>,
    config: Option<&VmConfig>,
    req: &SnapshotRequest,
    handed_store: Option<&Path>,
) -> Result<SnapshotPlan, ControllerError> {
    match state {
        VmState::Running if !req.pause => {
            return Err(ControllerError::refused(
                "cannot snapshot a VM that is running: pause it first, or ask for pause (--pause)",
            ))
        }
        VmState::Running | VmState::Paused => {}
        other => {
            return Err(ControllerError::refused(format!(
                "cannot snapshot a VM that is {other}"
            )))
        }
    }
    let max_snapshots = req
        .max_snapshots
        .map_or(ray_snapshot::SnapshotStore::DEFAULT_MAX_PER_VM, |m| {
            m as usize
        });
    if max_snapshots == 0 {
        return Err(ControllerError::invalid(
            "max_snapshots is 0; it must be at least 1",
        ));
    }
    let path = PathBuf::from(&req.path);
    if !path.is_absolute() {
        return Err(ControllerError::invalid(format!(
            "snapshot path {} must be absolute (it is resolved by the VMM)",
            path.display()
        )));
    }
    let write_path = match (handed_store, path.file_name()) {
        (Some(store), Some(name)) => store.join(name),
        (Some(_), None) => {
            return Err(ControllerError::invalid(format!(
                "snapshot path {} names no snapshot",
                path.display()
            )))
        }
        (None, _) => {
            crate::jailed::check_writable(&path, "the snapshot")
                .map_err(ControllerError::refused)?;
            path.clone()
        }
    };
    if write_path.exists() {
        return Err(ControllerError::invalid(format!(
            "snapshot path {} already exists; a snapshot never overwrites another",
            path.display()
        )));
    }
    let (store, id) =
        crate::snapshot::split_path(&path).map_err(|e| ControllerError::invalid(e.to_string()))?;
    let parent = match (req.kind, last) {
        (SnapshotKind::Full, _) => None,
        (SnapshotKind::Incremental | SnapshotKind::Auto, Some((s, p))) if *s == store => {
            Some(p.clone())
        }
        (SnapshotKind::Auto, _) => None,
        (SnapshotKind::Incremental, Some((s, p))) => {
            return Err(ControllerError::invalid(format!(
                "an incremental snapshot goes beside its parent {}: use a path in {}",
                s.join(p).display(),
                s.display()
            )))
        }
        (SnapshotKind::Incremental, None) => {
            return Err(ControllerError::refused(
                "this VM has no earlier snapshot to be incremental on: take a full one first",
            ))
        }
    };
    let config = config
        .cloned()
        .ok_or_else(|| ControllerError::refused("the VM has no configuration"))?;
    Ok(SnapshotPlan {
        path,
        write_path,
        store,
        id,
        parent,
        config,
        max_snapshots,
    })
}
