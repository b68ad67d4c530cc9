//! The controller's half of live migration: starting one either way, carrying out the
//! migration thread's requests on the VM, and moving the VM where the outcome says.
use super::*;
use crate::logging::SpawnInSpan;
use ray_api::vmm::MigrationVmOutcome;

impl Controller {
    /// The operator fenced the target of a migration whose link failed after the
    /// switch-over: the paused source copy runs again here.
    pub(super) fn reclaim(&mut self) -> Result<MigrationStatus, ControllerError> {
        let h = self.migration_handle()?.clone();
        let status = h.status();
        if status.vm != MigrationVmOutcome::PausedOwnershipUncertain
            || self.state != VmState::MigrationSource
        {
            return Err(ControllerError::refused(format!(
                "nothing to reclaim: the migration of VM '{}' left it {} (the VM is {}); reclaim is only for a source paused after the switch-over",
                self.id, status.vm, self.state
            )));
        }
        self.check(VmAction::MigrationAbort)?;
        let m = self.machine.as_mut().ok_or_else(|| {
            ControllerError::refused(format!("the VM is {} and has no machine", self.state))
        })?;
        m.throttle(0);
        if let Some(id) = self.migration_log.take() {
            let _ = m.vm.remove_dirty_consumer(id);
        }
        m.resume();
        self.apply(
            VmAction::MigrationAbort,
            "migrate:reclaimed by the operator after fencing the target",
        )?;
        h.update(|r| r.vm = MigrationVmOutcome::Running);
        if let Ok(json) = serde_json::to_vec_pretty(&h.status()) {
            let _ = std::fs::write(self.paths.migration_record(), json);
        }
        Ok(h.status())
    }

    pub(super) fn migration_handle(&self) -> Result<&mig::Handle, ControllerError> {
        self.migration.as_ref().ok_or_else(|| {
            ControllerError::not_found(format!(
                "VM '{}' has no migration; start one with PUT /vm/migration",
                self.id
            ))
        })
    }

    /// Starts migrating this running VM to `req.to` on a migration thread. Every check
    /// (state, settings, address, key file, configuration) comes before the first side
    /// effect (a host-wide slot, the state change, the thread): a refused request leaves
    /// the VM as it was.
    pub(super) fn migrate_out(
        &mut self,
        req: MigrateRequest,
    ) -> Result<MigrationStatus, ControllerError> {
        self.check(VmAction::MigrateOut)?;
        let (mut policy, limit) = policy_of(&req)?;
        let to = ray_migration::Endpoint::parse(&req.to).map_err(ControllerError::invalid)?;
        // A jailed VMM cannot reach the target (its network namespace is its own) nor open
        // the key file (outside its root): a client in the host's namespaces hands both.
        let (key, handed, handed_slot) = match &req.handoff {
            Some(token) => {
                let inbox = self.handoff.as_mut().ok_or_else(|| {
                    ControllerError::refused(format!(
                        "this VMM takes no hand-offs ({token:?} names one): only a jailed VMM listens on {}",
                        crate::handoff::SOCKET
                    ))
                })?;
                // The connection, the key file and the host-wide migration slot `ray`
                // holds locked for it (the runtime directory is outside the jail).
                let mut fds = inbox
                    .take(token, 3)
                    .map_err(ControllerError::invalid)?
                    .into_iter();
                let (Some(stream), Some(key), Some(slot)) = (fds.next(), fds.next(), fds.next())
                else {
                    return Err(ControllerError::invalid("a hand-off lost its descriptors"));
                };
                let key = ray_migration::read_key_from(key.into(), Path::new(&req.key_file))
                    .map_err(ControllerError::invalid)?;
                (key, Some(stream), Some(mig::Slot::from_handed(slot.into())))
            }
            None => {
                if crate::jailed::get().is_some() {
                    return Err(ControllerError::refused(format!(
                        "this VM's VMM is jailed: it cannot connect to {to} or read {} itself (its network namespace and root are its own); `ray migrate start` hands it both, or start the VM with --no-jail",
                        req.key_file
                    )));
                }
                let key = ray_migration::read_key_file(Path::new(&req.key_file))
                    .map_err(ControllerError::invalid)?;
                (key, None, None)
            }
        };
        let config = self
            .config
            .clone()
            .ok_or_else(|| ControllerError::refused("the VM has no configuration"))?;
        let machine = self.machine()?;
        let compat = mig::compat_info(
            &config,
            self.flavour,
            &crate::snapshot::cpu_fingerprint(&machine.vm.kvm),
        );
        let mem = machine.vm.memory.clone();
        // Copied disks are opened now, so a disk that cannot be read refuses the request
        // before anything changed.
        let disks = if req.copy_disks {
            mig::disks::source_disks(&config).map_err(ControllerError::refused)?
        } else {
            Vec::new()
        };
        let recheck = req.recheck_memory.then(|| recheck_cost(&mem));
        if let Some(cost) = recheck {
            // The recheck rereads memory while the guest is paused: its time is part of
            // the pause, so the convergence counts it like the state transfer.
            policy.state_transfer_cost += cost;
        }
        let slot = match handed_slot {
            Some(slot) => slot,
            None => {
                mig::acquire_slot(&self.paths.runtime(), limit).map_err(ControllerError::refused)?
            }
        };
        let handle = mig::Handle::new(MigrationRole::Source, to.to_string());
        let mut cfg = ray_migration::SenderConfig::new(key);
        cfg.policy = policy;
        cfg.compress = req.compress;
        cfg.protection = ray_migration::Protection::for_endpoint(&to, req.insecure_plaintext);
        cfg.recheck_memory = req.recheck_memory;
        let copied: Vec<String> = disks.iter().map(|d| d.id.clone()).collect();
        cfg.disks = disks;
        handle.update(|r| r.copy_disks = req.copy_disks);
        cfg.cancel = handle.cancel.clone();
        cfg.progress = handle.progress.clone();
        let mut cause = match recheck {
            Some(cost) => format!(
                "api:migrate to {to} (memory recheck of ~{:.1} ms counted in the downtime)",
                cost.as_secs_f64() * 1e3
            ),
            None => format!("api:migrate to {to}"),
        };
        if req.copy_disks {
            cause.push_str(&format!(" copying disks [{}]", copied.join(", ")));
        }
        self.apply(VmAction::MigrateOut, &cause)?;
        self.migration = Some(handle.clone());
        self.migration_span = tracing::info_span!("migration", direction = "out", peer = %req.to);
        let _in_migration = self.migration_span.clone().entered();
        tracing::info!(to = %req.to, "migration started");
        let inbox = self.vcpu_events.clone();
        let cancel = handle.cancel.clone();
        let spawned = std::thread::Builder::new()
            .name("migration-out".into())
            .spawn_in_span(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Migration);
                let _slot = slot;
                let stream = match handed {
                    Some(fd) => ray_migration::adopt(&to, fd, MIGRATION_IO_TIMEOUT),
                    None => ray_migration::connect(&to, MIGRATION_IO_TIMEOUT),
                };
                let result = stream
                    .map_err(|e| {
                        mig::SourceError::Setup(format!("cannot connect to the target {to}: {e}"))
                    })
                    .and_then(|stream| {
                        let mut link = mig::Link::new(inbox.clone(), cancel);
                        ray_migration::send_migration(stream, &mem, &mut link, &compat, &cfg)
                            .map_err(|f| mig::SourceError::Driver(Box::new(f)))
                    });
                let _ = inbox.send(Message::MigrationEnded(Ended::Source(result)));
            });
        if let Err(e) = spawned {
            let why = format!("cannot start the migration thread: {e}");
            self.end_migration(None, MigrationVmOutcome::Running, Some(why.clone()));
            let _ = self.apply(VmAction::MigrationAbort, "migration:failed to start");
            return Err(ControllerError::failed(why));
        }
        Ok(handle.status())
    }

    /// Target: takes the vCPUs and memory of the VM to receive. The kernel and command
    /// line are not needed (the machine comes from the source's state) and arrive with it.
    pub fn configure_incoming(&mut self, cfg: VmConfig) -> Result<(), ControllerError> {
        self.check(VmAction::Configure)?;
        config::validate_shape(&cfg, config::host_memory())
            .map_err(|e| ControllerError::invalid(e.to_string()))?;
        self.apply(VmAction::Configure, "migrate:configure")?;
        self.config = Some(cfg);
        Ok(())
    }

    /// Target: memory and a KVM VM (with dirty logging) for a VM of `config`, kept for
    /// the switch-over; returns the memory and what the source must match.
    pub(super) fn prepare_incoming(
        &mut self,
        config: &VmConfig,
        regions: Option<&[(vm_memory::GuestAddress, usize, usize)]>,
    ) -> Result<mig::Prepared, ControllerError> {
        config::validate_shape(config, config::host_memory())
            .map_err(|e| ControllerError::invalid(e.to_string()))?;
        let kvm = kvm_ioctls::Kvm::new()
            .map_err(|e| ControllerError::failed(format!("cannot open /dev/kvm: {e}")))?;
        let mut compat = mig::compat_info(
            config,
            self.flavour,
            &crate::snapshot::cpu_fingerprint(&kvm),
        );
        drop(kvm);
        // Regions the source described (a target not told the VM's shape), else this
        // configuration's.
        let regions = match regions {
            Some(r) => r.to_vec(),
            None => crate::numa::config_regions(config),
        };
        compat.regions = regions
            .iter()
            .map(|&(gpa, len, _)| ray_migration::protocol::MemoryRegion {
                gpa: gpa.0,
                size: len as u64,
            })
            .collect();
        let memory = crate::memory::MemoryManager::create_split(&regions)
            .map_err(|e| ControllerError::failed(e.to_string()))?;
        let vm = Vm::with_dirty_logging(memory.clone(), self.flavour)
            .map_err(|e| ControllerError::failed(format!("cannot create the VM: {e}")))?;
        // Fresh memory: zero pages into untouched memory cost nothing.
        memory.track_fresh();
        self.incoming_vm = Some(vm);
        self.config = Some(config.clone());
        Ok(mig::Prepared { memory, compat })
    }

    /// Target: listens on `inc.listen` (or on the listener `ray` handed a jailed target)
    /// and waits (on a migration thread) for one incoming migration. With a configuration (vCPUs, memory) the memory is allocated now and
    /// the source must match it; without one it is allocated for what the source
    /// describes once it has authenticated. With `prefault` (which needs the
    /// configuration), another thread populates all of the memory while waiting (until
    /// the migration ends). Connections that fail before proving the pre-shared key are
    /// dropped and logged; the target keeps waiting. Returns the bound address.
    pub fn listen_incoming(&mut self, inc: crate::Incoming) -> Result<String, ControllerError> {
        let crate::Incoming {
            listen: at,
            key_file,
            max_concurrent,
            prefault,
            insecure_plaintext,
            disk_dir,
            handed,
        } = inc;
        let (at, key_file, disk_dir) = (at.as_str(), key_file.as_path(), disk_dir.as_deref());
        self.check(VmAction::MigrateIn)?;
        if handed.is_none() {
            crate::jailed::refuse_if_jailed("listen for a migration itself (`ray migrate receive` hands a jailed target its listener)")
                .map_err(ControllerError::refused)?;
        }
        let disk_dir = match disk_dir {
            Some(d) => Some(check_disk_dir(d).map_err(ControllerError::invalid)?),
            None => None,
        };
        if disk_dir.is_some() {
            if let Some(p) = ray_migration::disk::tag_problem(&self.id) {
                return Err(ControllerError::invalid(p));
            }
        }
        let given = self.config.clone();
        if let Some(c) = &given {
            config::validate_shape(c, config::host_memory())
                .map_err(|e| ControllerError::invalid(e.to_string()))?;
        } else if prefault {
            return Err(ControllerError::invalid(
                "prefault needs the VM's memory size up front: give the target its memory (--memory) or leave out --prefault",
            ));
        }
        let endpoint = ray_migration::Endpoint::parse(at).map_err(ControllerError::invalid)?;
        let (listener, key, slot) = match handed {
            Some(h) => (
                Some(h.listener),
                ray_migration::read_key_from(h.key, key_file),
                Some(h.slot),
            ),
            None => (None, ray_migration::read_key_file(key_file), None),
        };
        let key = key.map_err(ControllerError::invalid)?;
        if max_concurrent == 0 {
            return Err(ControllerError::invalid(
                "max_concurrent is 0; it must be at least 1",
            ));
        }
        // Checked: now the side effects, each undone (dropped) if a later one fails.
        let slot = match slot {
            Some(file) => mig::Slot::from_handed(file),
            None => mig::acquire_slot(&self.paths.runtime(), max_concurrent)
                .map_err(ControllerError::refused)?,
        };
        let listener = match listener {
            Some(fd) => ray_migration::Listener::adopt(fd, endpoint.clone()),
            None => ray_migration::Listener::bind(&endpoint),
        }
        .map_err(|e| ControllerError::invalid(e.to_string()))?;
        let prepared = match &given {
            Some(c) => Some(self.prepare_incoming(c, None)?),
            None => None,
        };
        let local = listener.local();
        let handle = mig::Handle::new(MigrationRole::Target, local.clone());
        let mut cfg = ray_migration::ReceiverConfig::new(key);
        cfg.protection = ray_migration::Protection::for_endpoint(&endpoint, insecure_plaintext);
        cfg.progress = handle.progress.clone();
        cfg.cancel = handle.cancel.clone();
        if let Some(dir) = &disk_dir {
            // Partial copies a killed target of this VM left go now (and again when the
            // disks are announced).
            match ray_migration::disk::remove_stale_parts(dir, &self.id) {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(files = ?gone, "removed partial disk copies an earlier target of this VM left")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        cfg.disk_dir = disk_dir;
        cfg.disk_tag = self.id.clone();
        self.apply(VmAction::MigrateIn, &format!("migrate:listen on {local}"))?;
        if let Some(p) = &prepared {
            let prefault = prefault.then(|| crate::prefault::spawn(p.memory.ram().clone()));
            if let Some(pf) = &prefault {
                handle.update(|r| r.prefault = Some(pf.clone()));
            }
            p.memory.set_prefault(prefault);
        }
        self.migration = Some(handle.clone());
        self.migration_span = tracing::info_span!("migration", direction = "in", listen = %local);
        let _in_migration = self.migration_span.clone().entered();
        tracing::info!(prefault, "waiting for an incoming migration");
        let inbox = self.vcpu_events.clone();
        let shape = given.map(|c| (c.vcpus, c.memory_bytes));
        let spawned = std::thread::Builder::new()
            .name("migration-in".into())
            .spawn_in_span(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Migration);
                let _slot = slot;
                let mut link = mig::Link::new(inbox.clone(), cfg.cancel.clone());
                let result = receive_incoming(listener, &local, prepared, shape, &mut link, &cfg);
                let _ = inbox.send(Message::MigrationEnded(Ended::Target(result)));
            });
        if let Err(e) = spawned {
            let why = format!("cannot start the migration thread: {e}");
            self.end_migration(None, MigrationVmOutcome::Discarded, Some(why.clone()));
            self.incoming_vm = None;
            self.terminate(VmAction::MigrationAbort, "migrate:failed to start", None);
            return Err(ControllerError::failed(why));
        }
        Ok(handle.status().peer)
    }

    /// Carries out one request of the migration thread.
    pub fn migration_op(&mut self, op: MigrationOp) -> OpResult {
        let span = self.migration_span.clone();
        let _in_migration = span.enter();
        // At debug level (`RUST_LOG=ray_vmm::controller=debug`) each step and its duration.
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return self.migration_op_inner(op);
        }
        let name: String = match &op {
            MigrationOp::RestoreState(blob) => format!("RestoreState({} bytes)", blob.len()),
            op => format!("{op:?}").chars().take(24).collect(),
        };
        let t = Instant::now();
        let r = self.migration_op_inner(op);
        tracing::debug!(step = %name, took_us = t.elapsed().as_micros() as u64, ok = r.is_ok(), "migration step");
        r
    }

    pub(super) fn migration_op_inner(&mut self, op: MigrationOp) -> OpResult {
        let source = matches!(
            op,
            MigrationOp::StartDirtyLog
                | MigrationOp::DirtyLog
                | MigrationOp::StopDirtyLog
                | MigrationOp::Pause
                | MigrationOp::Resume
                | MigrationOp::Throttle(_)
                | MigrationOp::SaveState
        );
        let want = if source {
            VmState::MigrationSource
        } else {
            VmState::MigrationTarget
        };
        if self.state != want && !matches!(op, MigrationOp::Discard) {
            return Err(format!("the VM is {}, not {want}", self.state));
        }
        let now = self.state;
        let gone = move || format!("the VM is {now} and has no machine");
        match op {
            // The migration is one consumer of the dirty log among others (incremental
            // snapshots): it takes its own pages and steals none of theirs.
            MigrationOp::StartDirtyLog => {
                let m = self.machine.as_mut().ok_or_else(gone)?;
                if self.migration_log.is_none() {
                    let id =
                        m.vm.add_dirty_consumer("migration", None)
                            .map_err(|e| e.to_string())?;
                    self.migration_log = Some(id);
                }
                // Logging is on: a page outside the memfd's data now is either still a
                // hole (zero) or written from now on, and then in a later dirty log.
                m.vm.memory.track_zero_pages();
                Ok(OpReply::Done)
            }
            MigrationOp::StopDirtyLog => {
                let m = self.machine.as_mut().ok_or_else(gone)?;
                if let Some(id) = self.migration_log.take() {
                    m.vm.remove_dirty_consumer(id).map_err(|e| e.to_string())?;
                }
                Ok(OpReply::Done)
            }
            MigrationOp::DirtyLog => {
                let m = self.machine.as_ref().ok_or_else(gone)?;
                let id = self
                    .migration_log
                    .ok_or("dirty logging was not started for this migration")?;
                let pages = m.vm.take_dirty(id).map_err(|e| e.to_string())?;
                Ok(OpReply::Dirty(pages))
            }
            MigrationOp::Pause => {
                // The guest's heartbeat stops when the pause begins.
                let t = mig::unix_us();
                self.machine.as_ref().ok_or_else(gone)?.pause();
                if let Some(h) = &self.migration {
                    h.update(|r| r.paused_at_unix_us = Some(t));
                }
                Ok(OpReply::Done)
            }
            MigrationOp::Resume => {
                self.machine.as_ref().ok_or_else(gone)?.resume();
                if let Some(h) = &self.migration {
                    h.update(|r| r.paused_at_unix_us = None);
                }
                Ok(OpReply::Done)
            }
            MigrationOp::Throttle(p) => {
                self.machine.as_ref().ok_or_else(gone)?.throttle(p);
                Ok(OpReply::Done)
            }
            MigrationOp::SaveState => {
                let m = self.machine.as_ref().ok_or_else(gone)?;
                let machine = m.save().map_err(|e| e.to_string())?;
                let state = mig::MigrationState {
                    config: self.config.clone().ok_or("the VM has no configuration")?,
                    uptime_ms: self.started.map_or(0, |t| t.elapsed().as_millis() as u64),
                    machine,
                };
                serde_json::to_vec(&state)
                    .map(OpReply::State)
                    .map_err(|e| format!("cannot encode the VM state: {e}"))
            }
            MigrationOp::RestoreState(blob) => {
                self.accept_incoming_state(&blob).map(|_| OpReply::Done)
            }
            MigrationOp::TargetResume => {
                if mig::fault_injected("target-exit-at-switchover") {
                    // Test hook: the target dies between the source's commit point and
                    // its own resume; the source must not come back by itself.
                    tracing::warn!("RAY_FAULT=target-exit-at-switchover: exiting");
                    std::process::exit(86);
                }
                self.start_incoming()?;
                let m = self.machine.as_ref().ok_or_else(gone)?;
                let mem = m.vm.memory.clone();
                // From here on the guest writes this memory: stop treating untouched pages
                // as known zero (a later migration or snapshot learns them afresh).
                mem.untrack_zero_pages();
                // The guest's heartbeat as it stopped on the source: the first change
                // after the start below is the end of the downtime the guest saw.
                let baseline = heartbeat::sample(mem.ram()).map(|(c, _)| c);
                let t = mig::unix_us();
                m.resume();
                if let Some(h) = &self.migration {
                    h.update(|r| r.resumed_at_unix_us = Some(t));
                    mig::watch_heartbeat(mem, baseline, h.clone());
                }
                // The lifecycle transition (and its audit record) follows the reply:
                // see `finish_target_resume`.
                Ok(OpReply::Done)
            }
            MigrationOp::PrepareTarget(config, regions) => {
                if self.incoming_vm.is_some() || self.machine.is_some() {
                    return Err("the target has its memory already".into());
                }
                self.prepare_incoming(&config, Some(&regions))
                    .map(OpReply::Prepared)
                    .map_err(|e| e.to_string())
            }
            MigrationOp::DisksArrived(disks) => {
                if self.incoming_state.is_some() || !self.copied_disks.is_empty() {
                    return Err(
                        "the copied disks were announced after the VM state, or twice".into(),
                    );
                }
                tracing::info!(disks = ?disks, "the source copies its disks here");
                self.copied_disks = disks;
                Ok(OpReply::Done)
            }
            MigrationOp::Discard => {
                self.stop_prefault();
                if let Some(mut m) = self.machine.take() {
                    m.shutdown();
                }
                self.incoming_vm = None;
                self.incoming_state = None;
                Ok(OpReply::Done)
            }
        }
    }

    /// Target, right after the driver learnt that the VM runs here: the lifecycle state
    /// follows (off the downtime's critical path: the audit record goes to disk).
    pub fn finish_target_resume(&mut self) {
        if self.state == VmState::MigrationTarget && self.machine.is_some() {
            let _ = self.apply(VmAction::MigrationComplete, "migrate:resumed here");
        }
    }

    /// Target: checks the source's state blob and keeps it. The machine is built from it
    /// only when the source relinquished the VM ([`Self::start_incoming`]): restoring vCPU
    /// state makes KVM write guest memory (kvmclock, PVM's shared page), which must not
    /// happen before both sides compared their memory.
    pub(super) fn accept_incoming_state(&mut self, blob: &[u8]) -> Result<(), String> {
        let mut st: mig::MigrationState = serde_json::from_slice(blob)
            .map_err(|e| format!("the source's VM state is not valid: {e}"))?;
        // Copied disks: the VM runs on the files made here (the other disks are shared
        // storage, at the source's paths, and checked as such below).
        mig::disks::use_copies(&mut st.config, &self.copied_disks)?;
        let ours = self.config.as_ref().ok_or("the VM has no configuration")?;
        if (st.config.vcpus, st.config.memory_bytes) != (ours.vcpus, ours.memory_bytes)
            || st.machine.vcpus.len() != usize::from(ours.vcpus)
        {
            return Err(format!(
                "the source's VM state describes {} vCPUs ({} saved) and {} bytes of RAM; this VM has {} vCPUs and {} bytes",
                st.config.vcpus,
                st.machine.vcpus.len(),
                st.config.memory_bytes,
                ours.vcpus,
                ours.memory_bytes
            ));
        }
        if st.machine.flavour != self.flavour.name() {
            return Err(format!(
                "the source's VM state was saved on a {} host and this host is {}",
                st.machine.flavour,
                self.flavour.name()
            ));
        }
        if self.incoming_state.is_some() || self.machine.is_some() {
            return Err("the VM state arrived twice".into());
        }
        // A jailed target was made before it knew the VM: what it cannot hold is refused
        // here, before the switch-over (the source runs on).
        crate::jailed::check_incoming(&crate::vsock::settle(&st.config.devices, &self.paths.dir))?;
        if let Some(pci) = &st.machine.pci {
            let devices = crate::vsock::settle(&st.config.devices, &self.paths.dir);
            crate::pci::check_state(&devices, pci).map_err(|e| e.to_string())?;
        }
        self.incoming_state = Some(Box::new(st));
        Ok(())
    }

    /// Target, after `Switchover`: builds the machine over the received memory and starts it.
    pub(super) fn start_incoming(&mut self) -> Result<(), String> {
        let st = self
            .incoming_state
            .take()
            .ok_or("no VM state arrived before the switch-over")?;
        let vm = self
            .incoming_vm
            .take()
            .ok_or("the incoming guest memory is gone")?;
        let sinks = self.console_sinks().map_err(|e| e.to_string())?;
        let inbox = self.vcpu_events.clone();
        let events: EventSink = Arc::new(move |e| {
            let _ = inbox.send(Message::Vcpu(e));
        });
        let rings = st.config.numa_attribution == ray_api::vmm::NumaAttribution::Ring;
        let devices = crate::vsock::settle(&st.config.devices, &self.paths.dir);
        let machine = Machine::restore_on(vm, &st.machine, &devices, rings, sinks, events)
            .map_err(|e| e.to_string())?;
        self.numa = crate::numa::place_restored(&machine, &st.config);
        self.start_numa_policy(&machine, &st.config)
            .map_err(|e| e.to_string())?;
        self.machine = Some(machine);
        self.config = Some(st.config);
        self.started = Instant::now().checked_sub(Duration::from_millis(st.uptime_ms));
        Ok(())
    }

    /// Target: the memory is no longer waited for (the migration ended, or the target's
    /// memory is discarded): its prefault, if any, stops after its current step.
    pub(super) fn stop_prefault(&self) {
        if let Some(h) = &self.migration {
            h.update(|r| {
                if let Some(p) = &r.prefault {
                    p.stop();
                }
            });
        }
    }

    /// Records the end of the migration and leaves its status in the VM's directory.
    pub(super) fn end_migration(
        &mut self,
        state: Option<ray_migration::SessionState>,
        vm: MigrationVmOutcome,
        error: Option<String>,
    ) {
        self.stop_prefault();
        let Some(h) = &self.migration else { return };
        h.update(|r| {
            r.finished = Some(r.started.elapsed());
            if state.is_some() {
                r.state_override = state;
            }
            r.vm = vm;
            r.error = error;
        });
        let status = h.status();
        let _in_migration = self.migration_span.clone().entered();
        match &status.error {
            None => tracing::info!(state = %status.state, vm = %status.vm, "migration ended"),
            Some(why) => {
                tracing::warn!(state = %status.state, vm = %status.vm, error = %why, "migration failed")
            }
        }
        crate::metrics::migration_ended(&status);
        if let Ok(json) = serde_json::to_vec_pretty(&status) {
            let _ = std::fs::write(self.paths.migration_record(), json);
        }
    }

    /// The migration thread ended: move the VM where the outcome says.
    pub fn on_migration_ended(&mut self, ended: Ended) {
        use ray_migration::{SessionState as S, SourceVmAfterFailure as After};
        match ended {
            Ended::Source(Ok(report)) => {
                if let Some(h) = &self.migration {
                    h.update(|r| {
                        r.downtime_ms = Some(report.downtime.as_secs_f64() * 1e3);
                        r.total_ms = Some(report.total.as_secs_f64() * 1e3);
                        r.bulk_mib_s = report
                            .passes
                            .first()
                            .map(|p| p.bandwidth_bps / (1 << 20) as f64);
                        r.forced = report.forced;
                        r.passes = Some(report.passes.len() as u32);
                        r.bytes_sent = Some(report.bytes_sent);
                        if r.copy_disks {
                            r.disk_bytes_final = Some(report.disk_bytes_final);
                        }
                    });
                }
                let peer = self
                    .migration
                    .as_ref()
                    .map(|h| h.status().peer)
                    .unwrap_or_default();
                self.end_migration(Some(S::Completed), MigrationVmOutcome::Migrated, None);
                self.terminate(
                    VmAction::MigrationComplete,
                    &format!("migrate:completed to {peer}"),
                    Some(format!("migrated to {peer}")),
                );
            }
            Ended::Source(Err(mig::SourceError::Setup(why))) => {
                self.end_migration(
                    Some(S::Failed),
                    MigrationVmOutcome::Running,
                    Some(why.clone()),
                );
                let _ = self.apply(VmAction::MigrationAbort, &format!("migrate:failed: {why}"));
            }
            Ended::Source(Err(mig::SourceError::Driver(f))) => {
                let why = format!("{} (failed in {})", f.error, mig::api_state(f.failed_in));
                match f.vm {
                    After::Running => {
                        self.end_migration(
                            Some(f.session.state()),
                            MigrationVmOutcome::Running,
                            Some(why.clone()),
                        );
                        let _ = self.apply(
                            VmAction::MigrationAbort,
                            &format!("migrate:rolled back: {why}"),
                        );
                    }
                    After::RollbackFailed => {
                        self.end_migration(
                            Some(f.session.state()),
                            MigrationVmOutcome::RollbackFailed,
                            Some(why.clone()),
                        );
                        let _ =
                            self.apply(VmAction::Fail, &format!("migrate:rollback failed: {why}"));
                        self.exit_reason = Some(format!("the migration's rollback failed: {why}"));
                    }
                    After::PausedOwnershipUncertain => {
                        // The split-brain rule: the target may run the VM; stay paused.
                        self.end_migration(
                            Some(f.session.state()),
                            MigrationVmOutcome::PausedOwnershipUncertain,
                            Some(why),
                        );
                    }
                }
            }
            Ended::Target(Ok(_)) => {
                self.end_migration(Some(S::Completed), MigrationVmOutcome::Running, None);
                self.incoming_vm = None;
            }
            Ended::Target(Err(e)) => {
                if !self.copied_disks.is_empty() {
                    // The driver removed them as it failed.
                    tracing::info!(disks = ?self.copied_disks, "removed the partial copies of the disks");
                    self.copied_disks.clear();
                }
                // A failed target never ran the VM (the driver resumes it only after the
                // last check): its copy goes.
                let (why, state) = match e {
                    mig::TargetError::Setup(why) => (why, S::Failed),
                    mig::TargetError::Driver(f) => (
                        format!("{} (failed in {})", f.error, mig::api_state(f.failed_in)),
                        f.session.state(),
                    ),
                };
                self.end_migration(
                    Some(state),
                    MigrationVmOutcome::Discarded,
                    Some(why.clone()),
                );
                self.incoming_vm = None;
                self.terminate(
                    VmAction::MigrationAbort,
                    &format!("migrate:incoming failed: {why}"),
                    Some(format!("incoming migration failed: {why}")),
                );
            }
        }
    }
}

/// The directory copied disks go to: it must exist and be a directory; made absolute.
fn check_disk_dir(dir: &Path) -> Result<std::path::PathBuf, String> {
    let abs = std::path::absolute(dir)
        .map_err(|e| format!("cannot resolve the disk directory {}: {e}", dir.display()))?;
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_dir() => Ok(abs),
        Ok(_) => Err(format!(
            "the disk directory {} is not a directory",
            abs.display()
        )),
        Err(e) => Err(format!(
            "the disk directory {} is not usable: {e}",
            abs.display()
        )),
    }
}

/// How long a connection may take to prove the pre-shared key: a real source sends its
/// `Hello` and `Auth` at once, so a connection that stays silent longer is not one, and
/// the target moves on to the next (the source's own timeout is longer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// The migration thread of a target: accepts connections on `listener` until one proves
/// the pre-shared key (others are logged and dropped: a port scan or a stray request must
/// not end the wait), sizes the VM from what the source describes (or checks it against
/// `given`), and receives it.
fn receive_incoming(
    listener: ray_migration::Listener,
    local: &str,
    prepared: Option<mig::Prepared>,
    given: Option<(u8, u64)>,
    link: &mut mig::Link,
    cfg: &ray_migration::ReceiverConfig,
) -> Result<ray_migration::ReceiveReport, mig::TargetError> {
    let driver = |f: ray_migration::ReceiveFailure| mig::TargetError::Driver(Box::new(f));
    let source = loop {
        let stream = listener
            .accept(&cfg.cancel, None, HANDSHAKE_TIMEOUT)
            .map_err(|e| {
                mig::TargetError::Setup(format!("no migration arrived on {local}: {e}"))
            })?;
        match ray_migration::receiver::authenticate(stream, cfg) {
            Ok(source) => break source,
            Err(f) if !f.authenticated => {
                tracing::warn!(
                    "dropped a connection on {local} ({f}); still waiting for the source"
                );
            }
            Err(f) => return Err(driver(f.into())),
        }
    };
    drop(listener);
    if let Err(e) = source.get_ref().set_io_timeout(Some(MIGRATION_IO_TIMEOUT)) {
        return Err(driver(source.refuse(format!(
            "the target cannot set the connection's timeouts: {e}"
        ))));
    }
    let shape = match mig::shape_of(source.source()) {
        Ok(s) => s,
        Err(why) => return Err(driver(source.refuse(why))),
    };
    if let Some(why) = given.and_then(|g| mig::shape_mismatch(g, shape)) {
        return Err(driver(source.refuse(why)));
    }
    let prepared = match prepared {
        Some(p) => p,
        None => {
            let config = VmConfig {
                kernel: String::new(),
                initrd: None,
                cmdline: String::new(),
                vcpus: shape.0,
                memory_bytes: shape.1,
                devices: Default::default(),
                numa: Vec::new(),
                numa_attribution: Default::default(),
                numa_migration: Default::default(),
            };
            match link.prepare(config, mig::source_regions(source.source())) {
                Ok(p) => p,
                Err(e) => {
                    return Err(driver(
                        source.refuse(format!("the target cannot hold the VM: {e}")),
                    ))
                }
            }
        }
    };
    source
        .receive(&prepared.memory, link, &prepared.compat, cfg)
        .map_err(driver)
}

/// The settings of a migration request as a convergence policy and the host-wide
/// migration limit; refuses values that cannot work, naming them. Unset limits keep the
/// policy's defaults (pre-copy time: `ray_migration::convergence::DEFAULT_MAX_TIME`, as the
/// API and the CLI document).
pub(super) fn policy_of(
    req: &MigrateRequest,
) -> Result<(ray_migration::Policy, u32), ControllerError> {
    if req.max_downtime_ms == 0 {
        return Err(ControllerError::invalid(
            "max_downtime_ms is 0; it must be at least 1",
        ));
    }
    if req.max_passes == Some(0) {
        return Err(ControllerError::invalid(
            "max_passes is 0; it must be at least 1",
        ));
    }
    if req.max_time_ms == Some(0) {
        return Err(ControllerError::invalid(
            "max_time_ms is 0; it must be at least 1",
        ));
    }
    let limit = req
        .max_concurrent
        .unwrap_or(ray_migration::progress::DEFAULT_MAX_CONCURRENT as u32);
    if limit == 0 {
        return Err(ControllerError::invalid(
            "max_concurrent is 0; it must be at least 1",
        ));
    }
    let mut policy = ray_migration::Policy {
        max_downtime: Duration::from_millis(req.max_downtime_ms),
        auto_converge: req.auto_converge,
        on_limit: match req.on_limit {
            OnLimit::Force => ray_migration::LimitAction::ForceStopAndCopy,
            OnLimit::Abort => ray_migration::LimitAction::Abort,
        },
        ..Default::default()
    };
    if let Some(n) = req.max_passes {
        policy.max_passes = n;
    }
    if let Some(ms) = req.max_time_ms {
        policy.max_time = Duration::from_millis(ms);
    }
    Ok((policy, limit))
}

/// What `--recheck-memory` adds to the pause: one read and hash of every page that may
/// hold data, at the rate this host hashes guest memory (measured on a sample of it).
pub(super) fn recheck_cost(mem: &crate::memory::MemoryManager) -> Duration {
    use ray_memory::GuestMemory;
    let extents = mem.data_extents();
    let data: u64 = extents.iter().map(|e| e.1).sum();
    let page = ray_memory::PAGE_SIZE;
    let mut sampled = 0u64;
    let t = Instant::now();
    for &(gpa, len) in &extents {
        let len = len.min((4 << 20) - sampled) / page * page;
        if let Ok(span) = mem.span(gpa, len) {
            for p in span.chunks(page as usize) {
                std::hint::black_box(p.hash());
            }
            sampled += len;
        }
        if sampled >= 4 << 20 {
            break;
        }
    }
    let took = t.elapsed();
    if sampled == 0 {
        return Duration::ZERO;
    }
    // A quarter more, for pages touched since and a colder cache in the pause.
    took.mul_f64(data as f64 / sampled as f64 * 1.25)
}
