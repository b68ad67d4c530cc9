//! Help texts: examples for every command, and a help line for the few flags declared
//! without one (common flags such as `--json`), applied to the command tree at start-up.
//! Keeping the examples here, in one table, keeps them consistent with each other.
use clap::Command;

/// Examples of each command, by its path below `ray` ("" is `ray` itself).
const EXAMPLES: &[(&str, &str)] = &[
    (
        "numa",
        "ray numa status
ray numa nodes
ray numa vms -o json
ray numa explain web",
    ),
    ("numa status", "ray numa status\nray numa status -o json"),
    ("numa nodes", "ray numa nodes\nray numa nodes -o yaml"),
    (
        "numa vms",
        "ray numa vms                 binding, locality, writes per guest node, policy, pending moves
ray numa vms -o json",
    ),
    (
        "numa explain",
        "ray numa explain web         nodes, attribution, the last window's decisions, the decision log
ray numa explain web -o json",
    ),
    (
        "numa policy",
        "ray numa policy web --migrate dry-run --window 1s    decide and log, move nothing
ray numa policy web --migrate off                   the per-VM off switch, at run time
ray numa policy web --migrate on --rate 128 -o json",
    ),
    (
        "",
        "ray vm run                          boot rayvisor's guest, attached to its console
ray vm run --detach --vcpus 2 --memory 1G
ray vm list -o wide
ray vm console vm-1a2b3c4d          attach to a VM's console (Ctrl-] detaches)
ray snapshot create vm-1a2b3c4d /var/lib/snaps/s1 --pause
ray completion bash > /etc/bash_completion.d/ray",
    ),
    (
        "vm",
        "ray vm run --detach --id web --memory 512M
ray vm list
ray vm status web -o yaml
ray vm stop web && ray vm rm web",
    ),
    (
        "vm run",
        "ray vm run                                    attached: Ctrl-] detaches, the VM keeps running
ray vm run --detach --vcpus 4 --memory 2G --id db
ray vm run --detach --kernel vmlinux --initrd initrd.img --cmdline 'console=ttyS0'
ray vm run --detach -f vm.yaml                 the configuration `ray vm config ID -o yaml` prints
ray vm run --detach --api-tcp 127.0.0.1:0      also serve the API on a loopback port
ray vm run --detach --gpu emulated,device=bochs,width=800,height=600   a Bochs-style PCI display
ray vm run --detach --vcpus 2 --numa node=0,cpus=0,memory=64M --numa node=1,cpus=1,memory=64M \\
    --numa-attribution ring --numa-migrate dry-run,window=5s   attribute writes, decide page moves
ray vm run --detach --gpu-limits displays-per-gpu=8 --gpu virtio,displays=8   more scanouts than 4",
    ),
    (
        "vm exec",
        "ray vm exec web -- mem                 a guest shell command over vsock; exits with its status
ray vm exec web --json -- echo hi      {\"output\":\"hi\\n\",\"status\":0}
ray vm run --detach --id web --vsock cid=3     a VM with a vsock device (exec needs one)",
    ),
    (
        "vm list",
        "ray vm list
ray vm list -o wide          more columns: hypervisor, API address, why it ended
ray vm list -o json | jq -r '.[] | select(.state == \"running\") | .id'",
    ),
    (
        "vm status",
        "ray vm status web
ray vm status web -o json | jq .heartbeat",
    ),
    ("vm pause", "ray vm pause web\nray vm pause web -o json"),
    ("vm resume", "ray vm resume web"),
    (
        "vm suspend",
        "ray vm suspend web          memory goes to disk\nray vm resume web           and comes back",
    ),
    (
        "vm stop",
        "ray vm stop web                       ask the guest, force it after 5 s
ray vm stop web --timeout-ms 0        stop at once",
    ),
    (
        "vm events",
        "ray vm events web\nray vm events web -o json",
    ),
    (
        "vm console",
        "ray vm console web                    attach (Ctrl-] detaches; Ctrl-C goes to the guest)
ray vm console web --read-only        watch only
ray vm console web --write            take the input over from another console
ray vm console web --bytes 2000       print the last 2000 bytes and return
ray vm console web --send 'uptime'    type one line and return",
    ),
    (
        "vm logs",
        "ray vm logs web                       the serial console's log
ray vm logs web -f                    and follow it
ray vm logs web --vmm --since 10m     the VMM's own log of the last ten minutes
ray vm logs web --tail 20",
    ),
    (
        "vm config",
        "ray vm config web -o yaml > web.yaml
ray vm run --detach -f web.yaml --id web2",
    ),
    (
        "vm rm",
        "ray vm rm web                         a terminated or dead VM
ray vm stop web && ray vm rm web",
    ),
    (
        "vm prune",
        "ray vm prune                          remove every terminated or dead VM
ray vm prune --dry-run",
    ),
    (
        "vm checkpoint",
        "ray vm checkpoint web                 incremental on its previous checkpoint
ray vm checkpoint web --store /var/lib/snaps",
    ),
    (
        "snapshot",
        "ray snapshot create web /var/lib/snaps/s1 --pause
ray snapshot list /var/lib/snaps
ray snapshot restore /var/lib/snaps/s1 --detach --id web2",
    ),
    (
        "snapshot create",
        "ray snapshot create web /var/lib/snaps/s1 --pause
ray snapshot create web /var/lib/snaps/s2 --pause --incremental --compress",
    ),
    (
        "snapshot list",
        "ray snapshot list /var/lib/snaps\nray snapshot list /var/lib/snaps -o wide\nray snapshot list /var/lib/snaps -o json",
    ),
    ("snapshot status", "ray snapshot status /var/lib/snaps/s1\nray snapshot status /var/lib/snaps/s1 -o yaml"),
    (
        "snapshot restore",
        "ray snapshot restore /var/lib/snaps/s1
ray snapshot restore /var/lib/snaps/s1 --detach --id web2 --no-verify-memory",
    ),
    ("snapshot delete", "ray snapshot delete /var/lib/snaps/s1"),
    (
        "snapshot merge",
        "ray snapshot merge /var/lib/snaps/s3 --into s3-full",
    ),
    ("snapshot verify", "ray snapshot verify /var/lib/snaps/s1"),
    (
        "migrate",
        "ray migrate receive --listen 0.0.0.0:7000 --key-file /etc/ray/key   (on the target)
ray migrate start web --to 10.0.0.2:7000 --key-file /etc/ray/key     (on the source)",
    ),
    (
        "migrate start",
        "ray migrate start web --to 10.0.0.2:7000 --key-file /etc/ray/key
ray migrate start web --to unix:/run/ray/mig.sock --key-file key --max-downtime-ms 100 --detach
ray migrate start web --to 10.0.0.2:7000 --key-file /etc/ray/key --copy-disks   (target: --disk-dir)",
    ),
    (
        "migrate receive",
        "ray migrate receive --listen 0.0.0.0:7000 --key-file /etc/ray/key --id web
ray migrate receive --listen 0.0.0.0:7000 --key-file /etc/ray/key --disk-dir /var/lib/ray/disks
ray migrate receive --listen 0.0.0.0:7000 --key-file /etc/ray/key --shared-dir /srv/shared-disks",
    ),
    ("migrate status", "ray migrate status web\nray migrate status web -o yaml"),
    ("migrate progress", "ray migrate progress web"),
    ("migrate sessions", "ray migrate sessions\nray migrate sessions -o json"),
    ("migrate cancel", "ray migrate cancel web"),
    (
        "migrate reclaim",
        "ray migrate reclaim web --target-fenced      only once the target is known dead",
    ),
    (
        "vmm",
        "ray vmm --id web --dir /run/rayvisor/vms/web --config-json '{\"kernel\":\"k\",\"vcpus\":1,\"memory_bytes\":134217728}' --start",
    ),
    (
        "agent",
        "ray agent      (one host: the store of `ray controller` on this host)
ray agent --etcd http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379
ray agent --host node-7 --etcd http://127.0.0.1:2379 --api-tcp 0.0.0.0:7450 --api-token-file /etc/ray/agent.token
ray agent --host node-7 --etcd http://127.0.0.1:2379 --no-jail   (the host's VMMs unjailed; root jails them by default)",
    ),
    (
        "cluster",
        "ray cluster status --etcd http://127.0.0.1:2379
ray cluster nodes --etcd http://127.0.0.1:2379
ray cluster vms --etcd http://127.0.0.1:2379 -o json
ray cluster vm create web-1 --group web --etcd http://127.0.0.1:2379",
    ),
    ("cluster nodes", "ray cluster nodes --etcd http://127.0.0.1:2379 -o wide"),
    ("cluster vms", "ray cluster vms --etcd http://127.0.0.1:2379 -o yaml"),
    ("cluster status", "ray cluster status --etcd http://127.0.0.1:2379"),
    ("cluster pools", "ray cluster pools --etcd http://127.0.0.1:2379 --json"),
    (
        "cluster events",
        "ray cluster events --etcd http://127.0.0.1:2379 --tail 20\nray cluster events --etcd http://127.0.0.1:2379 --vm web-1 --json",
    ),
    ("cluster explain", "ray cluster explain web-3 --etcd http://127.0.0.1:2379"),
    (
        "cluster vm",
        "ray cluster vm create web-1 --memory-mib 512 --group web --etcd http://127.0.0.1:2379\nray cluster vm delete web-1 --etcd http://127.0.0.1:2379",
    ),
    (
        "cluster vm create",
        "ray cluster vm create db --vcpus 2 --memory-mib 1024 --pool critical --ha --restart-priority 9 --etcd http://127.0.0.1:2379",
    ),
    ("cluster vm delete", "ray cluster vm delete db --etcd http://127.0.0.1:2379"),
    (
        "cluster vm migrate",
        "ray cluster vm migrate db --etcd http://127.0.0.1:2379\nray cluster vm migrate db --to node-3 --detach --etcd http://127.0.0.1:2379\nray cluster vm migrate db --abort --etcd http://127.0.0.1:2379",
    ),
    (
        "controller",
        "ray controller      (one host: owns <runtime-dir>/cluster/store.redb)\nray controller --etcd http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379\nray controller --id ctl-a --etcd http://127.0.0.1:2379 --lease-ttl 20s --rebalance auto",
    ),
    (
        "node",
        "ray node cordon node-7 --etcd http://127.0.0.1:2379\nray node uncordon node-7 --etcd http://127.0.0.1:2379",
    ),
    ("node cordon", "ray node cordon node-7 --etcd http://127.0.0.1:2379"),
    (
        "node status",
        "ray node status node-7      (this host's agent, on its socket)\nray node status node-7 --agent http://10.0.0.7:7450 --token-file /etc/ray/agent.token -o json",
    ),
    (
        "node vms",
        "ray node vms node-7\nray node vms node-7 --agent unix:/run/rayvisor/agent/api.sock -o yaml",
    ),
    ("node uncordon", "ray node uncordon node-7 --etcd http://127.0.0.1:2379"),
    (
        "node drain",
        "ray node drain node-7 --etcd http://127.0.0.1:2379\nray node drain node-7 --abort --etcd http://127.0.0.1:2379",
    ),
    (
        "sim",
        "ray sim --hosts 100 --vms 5000
ray sim --scenario drain.yaml --json",
    ),
    (
        "bench",
        "ray bench boot --runs 20\nray bench snapshot\nray bench migrate\nray bench idle",
    ),
    ("bench boot", "ray bench boot --runs 20 --memory 1G --json"),
    ("bench snapshot", "ray bench snapshot --json"),
    ("bench migrate", "ray bench migrate --json"),
    ("bench idle", "ray bench idle\nray bench idle --vcpus 1 --window 10s --json"),
    ("bench cluster", "ray bench cluster --hosts 1000 --json"),
    ("bench blk", "ray bench blk\nray bench blk --runs 3 --size 256M --json"),
    ("bench net", "ray bench net\nray bench net --runs 5 --packets 100000 --json"),
    (
        "bench numa",
        "ray bench numa --json                  from the repository's root (runs scripts/numa-qemu-test)
ray bench numa --qemu-runs 0 --rate 128   attribution overhead only",
    ),
    ("bench display", "ray bench display\nray bench display --runs 50 --json"),
    (
        "gpu",
        "ray vm run --detach --id desk --gpu emulated,width=1280,height=800
ray vm run --detach --id pcidesk --gpu emulated,device=bochs   the guest finds PCI 1234:1111 and sets the mode
ray gpu status desk
ray gpu screenshot desk -o desk.png",
    ),
    ("gpu status", "ray gpu status desk\nray gpu status desk -o json"),
    ("gpu list", "ray gpu list desk"),
    ("gpu displays", "ray gpu displays desk\nray gpu displays desk -o yaml"),
    (
        "gpu screenshot",
        "ray gpu screenshot desk -o desk.png\nray gpu screenshot desk --display 1 -o second.png",
    ),
    ("gpu type", "ray gpu type desk 'echo hi\\n'"),
    (
        "gpu backend",
        "ray gpu backend --socket /run/gpu-backend.sock\n\
         ray vm run --gpu remote,socket=/run/gpu-backend.sock\n\
         ray gpu backend --listen 127.0.0.1:7000 --token-file /etc/ray/gpu.token",
    ),
    (
        "gpu-device",
        "ray gpu-device serve --socket /run/gpu-dev.sock\n\
         ray vm run --gpu passthrough,vfio-user=/run/gpu-dev.sock",
    ),
    (
        "gpu-device serve",
        "ray gpu-device serve --socket /run/gpu-dev.sock\n\
         ray vm run --gpu passthrough,vfio-user=/run/gpu-dev.sock",
    ),
    (
        "gpu encode",
        "ray gpu encode start desk -o desk.h264\nray gpu encode list desk\nray gpu encode watch desk 1 -o - | ffplay -\nray gpu encode stop desk 1",
    ),
    (
        "gpu encode start",
        "ray gpu encode start desk -o desk.h264\nray gpu encode start desk --display 1 --bitrate 4M --fps 60 -o second.h264\nray gpu encode start desk --codec vp9    # no file: for watchers only",
    ),
    ("gpu encode stop", "ray gpu encode stop desk 1"),
    (
        "gpu encode watch",
        "ray gpu encode watch desk 1 -o - | ffplay -\nray gpu encode watch desk 1 --seconds 10 -o clip.h264",
    ),
    ("gpu encode list", "ray gpu encode list desk\nray gpu encode list desk -o json"),
    (
        "gpu decode",
        "ray gpu decode desk.h264 -o frames/\nray gpu decode desk.h264 --last -o last.png",
    ),
    (
        "gpu decode-session",
        "ray gpu decode-session start desk --encode-session 1\nray gpu decode-session list desk\nray gpu decode-session frame desk 1 -o last.png\nray gpu decode-session stop desk 1",
    ),
    (
        "gpu decode-session start",
        "ray gpu decode-session start desk --encode-session 1    # its live stream, until it ends\nray gpu decode-session start desk --file /run/rayvisor/vms/desk/d0.h264 --wait\nray gpu decode-session start desk --codec vp9 --file /run/rayvisor/vms/desk/d0.ivf --json",
    ),
    (
        "gpu decode-session list",
        "ray gpu decode-session list desk\nray gpu decode-session list desk -o json",
    ),
    (
        "gpu decode-session show",
        "ray gpu decode-session show desk 1\nray gpu decode-session show desk 1 -o json",
    ),
    (
        "gpu decode-session frame",
        "ray gpu decode-session frame desk 1 -o last.png",
    ),
    ("gpu decode-session stop", "ray gpu decode-session stop desk 1"),
    (
        "web",
        "ray web --tokens tokens.txt
ray web --listen 127.0.0.1:0 --tokens tokens.txt --state-dir /var/lib/rayvisor/web
ray web --listen 0.0.0.0:8443 --tokens tokens.txt --tls-cert cert.pem --tls-key key.pem
ray web --tokens tokens.txt --cluster     with the hosts page (single-host store of ray controller)",
    ),
    (
        "gpu resize",
        "ray vm run --detach --id desk --gpu virtio,width=1024,height=768
ray gpu resize desk 1920x1080
ray gpu resize desk --display 1 800x600",
    ),
    (
        "device",
        "ray device serve blk --socket /run/vub.sock --disk d.img
ray device serve net --socket /run/vun.sock --net tap=tap0,netns=lab
ray device serve vsock --socket /run/vuv.sock --vsock cid=3,socket=/run/guest3.vsock",
    ),
    (
        "device serve",
        "ray device serve blk --socket /run/vub.sock --disk d.img,ro
ray device serve net --socket /run/vun.sock --net tap=tap0,mac=02:00:00:00:00:01
ray device serve vsock --socket /run/vuv.sock --vsock cid=3,socket=/run/guest3.vsock",
    ),
    (
        "device serve blk",
        "ray device serve blk --socket /run/vub.sock --disk d.img
ray device serve blk --socket /run/vub.sock --disk d.img,ro,id=data --queues 1
qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
  -machine q35,memory-backend=mem -chardev socket,id=c0,path=/run/vub.sock \\
  -device vhost-user-blk-pci,chardev=c0",
    ),
    (
        "device serve net",
        "ray device serve net --socket /run/vun.sock --net tap=tap0,netns=lab,mac=52:54:00:12:34:56
qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
  -machine q35,memory-backend=mem -chardev socket,id=c1,path=/run/vun.sock \\
  -netdev vhost-user,id=n0,chardev=c1 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
    ),
    (
        "device serve vsock",
        "ray device serve vsock --socket /run/vuv.sock --vsock cid=3,socket=/run/guest3.vsock
qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
  -machine q35,memory-backend=mem -chardev socket,id=c2,path=/run/vuv.sock \\
  -device vhost-user-vsock-pci,chardev=c2",
    ),
    (
        "device serve gpu",
        "ray device serve gpu --socket /run/vug.sock --mode 1280x800 --control /run/vug.ctl
qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
  -machine q35,memory-backend=mem -chardev socket,id=c3,path=/run/vug.sock \\
  -device vhost-user-gpu-pci,chardev=c3,queue_reset=off
echo 'screenshot 0 /tmp/scanout0.png' | socat - UNIX-CONNECT:/run/vug.ctl",
    ),
    ("openapi", "ray openapi vmm > vmm.json"),
    (
        "version",
        "ray version\nray version --vm web -o json",
    ),
    (
        "completion",
        "ray completion bash > /etc/bash_completion.d/ray
ray completion zsh > \"${fpath[1]}/_ray\"
ray completion fish > ~/.config/fish/completions/ray.fish",
    ),
    (
        "man",
        "ray man | man -l -
ray man --dir /usr/local/share/man/man1      one page per command",
    ),
];

/// The help line of a flag declared without one, by its id.
fn default_help(id: &str) -> Option<&'static str> {
    Some(match id {
        "json" => "Print JSON instead of text",
        "id" => "The VM's id",
        "detach" => "Return once the VM runs instead of attaching to its console",
        "compress" => "Compress the data (zstd for snapshots, lz4 for migration pages)",
        "runs" => "How many times to measure",
        "vcpus" => "Number of vCPUs",
        "memory" => "Guest memory, e.g. 128M or 2G",
        "seed" => "Random seed: the same seed gives the same scenario",
        _ => return None,
    })
}

fn examples(path: &str) -> Option<&'static str> {
    EXAMPLES.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
}

/// `cmd` and its subcommands with their examples and the missing flag help.
pub fn decorate(cmd: Command) -> Command {
    walk(cmd, "")
}

/// [`decorate`] for the subcommand at `path` (e.g. `vmm`) on its own.
pub fn decorate_at(cmd: Command, path: &str) -> Command {
    walk(cmd, path)
}

fn walk(mut cmd: Command, path: &str) -> Command {
    if let Some(ex) = examples(path) {
        let text: String = ex.lines().map(|l| format!("  {l}\n")).collect();
        cmd = cmd.after_help(format!("Examples:\n{text}"));
    }
    let bare: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.get_help().is_none() && !a.is_hide_set())
        .map(|a| a.get_id().to_string())
        .collect();
    for id in bare {
        if let Some(help) = default_help(&id) {
            cmd = cmd.mut_arg(id, |a| a.help(help));
        }
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in subs {
        let sub_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path} {name}")
        };
        cmd = cmd.mut_subcommand(&name, |c| walk(c, &sub_path));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command: its path and the command.
    fn all(cmd: &Command, path: String, out: &mut Vec<(String, Command)>) {
        out.push((path.clone(), cmd.clone()));
        for s in cmd.get_subcommands() {
            let p = if path.is_empty() {
                s.get_name().to_string()
            } else {
                format!("{path} {}", s.get_name())
            };
            all(s, p, out);
        }
    }

    #[test]
    fn every_command_has_a_description_and_examples_and_every_flag_help() {
        let cmd = decorate(crate::Cli::command());
        let mut cmds = Vec::new();
        all(&cmd, String::new(), &mut cmds);
        let mut missing = Vec::new();
        for (path, c) in &cmds {
            if c.get_about().is_none() && !path.is_empty() {
                missing.push(format!("`ray {path}` has no description"));
            }
            if !c
                .get_after_help()
                .is_some_and(|h| h.to_string().starts_with("Examples:"))
            {
                missing.push(format!("`ray {path}` has no examples"));
            }
            for a in c.get_arguments() {
                if a.get_help().is_none() && !a.is_hide_set() {
                    missing.push(format!("`ray {path}` --{} has no help", a.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
        // No example for a command that does not exist.
        for (p, _) in EXAMPLES {
            assert!(
                cmds.iter().any(|(c, _)| c == p),
                "examples for unknown `ray {p}`"
            );
        }
    }

    #[test]
    fn examples_use_commands_that_exist() {
        let cmd = decorate(crate::Cli::command());
        for (_, text) in EXAMPLES {
            for line in text.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let Some(i) = words.iter().position(|w| *w == "ray") else {
                    continue;
                };
                // The subcommand path of the example resolves.
                let mut c = &cmd;
                for w in &words[i + 1..] {
                    match c.find_subcommand(w) {
                        Some(s) => c = s,
                        None => break,
                    }
                }
                assert!(
                    !std::ptr::eq(c, &cmd) || words.len() == i + 1,
                    "example {line:?} names no command"
                );
            }
        }
    }
}
