//! `ray vm list|status|events|config` and the answer of the lifecycle actions, in every
//! output format (`-o table|wide|json|yaml`, `--json`).
use std::path::Path;

use clap::Args;
use ray_api::vmm::{LifecycleEvent, VmConfig, VmInfo};
use serde::Serialize;

use ray::client::VmmClient;
use ray::exit::{self, coded, NOT_FOUND};
use ray::output::{print_structured, table, Format, OutputArgs};
use ray::runtime::{self, Presence};

use crate::vm::{client, state_name};

/// `ray vm list` flags.
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub out: OutputArgs,
}

/// One row of `ray vm list`. Fields that do not apply (an ended VM has no vCPUs) are null.
#[derive(Serialize)]
struct ListRow {
    id: String,
    state: String,
    pid: Option<u32>,
    vcpus: Option<u8>,
    memory_bytes: Option<u64>,
    uptime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hypervisor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_tcp: Option<String>,
    /// Why an ended VM ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl ListRow {
    fn bare(id: String, state: String, pid: Option<u32>) -> Self {
        ListRow {
            id,
            state,
            pid,
            vcpus: None,
            memory_bytes: None,
            uptime_ms: None,
            hypervisor: None,
            api_tcp: None,
            reason: None,
        }
    }
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn list(runtime: &Path, out: &OutputArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for id in runtime::list_ids(runtime) {
        let dir = runtime::vm_dir(runtime, &id);
        let row = match runtime::presence(&dir) {
            Presence::Live { pid } => {
                match VmmClient::new(&dir.join("api.sock")).call::<VmInfo>("GET", "/vm", None) {
                    Ok(info) => ListRow {
                        state: state_name(info.state),
                        pid: Some(pid),
                        vcpus: info.config.as_ref().map(|c| c.vcpus),
                        memory_bytes: info.config.as_ref().map(|c| c.memory_bytes),
                        uptime_ms: Some(info.uptime_ms),
                        hypervisor: Some(info.hypervisor),
                        api_tcp: info.api_tcp,
                        reason: info.exit_reason,
                        id,
                    },
                    Err(_) => ListRow::bare(id, "unresponsive".into(), Some(pid)),
                }
            }
            Presence::Ended(r) => ListRow {
                reason: r.reason,
                ..ListRow::bare(id, state_name(r.state), None)
            },
            Presence::Dead { pid } => ListRow::bare(id, "dead".into(), pid),
        };
        rows.push(row);
    }
    let format = out.format();
    if print_structured(&rows, format)? {
        return Ok(());
    }
    let wide = format == Format::Wide;
    let mut header = vec!["ID", "STATE", "PID", "VCPUS", "MEMORY", "UPTIME"];
    if wide {
        header.extend(["HYPERVISOR", "API", "REASON"]);
    }
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            let mut c = vec![
                r.id,
                r.state,
                dash(r.pid),
                dash(r.vcpus),
                dash(r.memory_bytes.map(|m| format!("{}M", m >> 20))),
                dash(r.uptime_ms.map(|u| format!("{:.1}s", u as f64 / 1000.0))),
            ];
            if wide {
                c.extend([
                    dash(r.hypervisor),
                    dash(r.api_tcp.map(|a| format!("http://{a}"))),
                    dash(r.reason),
                ]);
            }
            c
        })
        .collect();
    print!("{}", table(&header, &cells));
    Ok(())
}

/// Prints a VM's information in `format`.
pub fn print_info(info: &VmInfo, format: Format) -> anyhow::Result<()> {
    if print_structured(info, format)? {
        return Ok(());
    }
    println!("id          {}", info.id);
    println!("state       {}", state_name(info.state));
    println!("pid         {}", info.pid);
    println!("hypervisor  {}", info.hypervisor);
    println!("uptime      {:.3}s", info.uptime_ms as f64 / 1000.0);
    if let Some(c) = &info.config {
        println!("vcpus       {}", c.vcpus);
        println!("memory      {} MiB", c.memory_bytes >> 20);
        println!("kernel      {}", c.kernel);
        if format == Format::Wide {
            if let Some(i) = &c.initrd {
                println!("initrd      {i}");
            }
        }
        println!("cmdline     {}", c.cmdline);
    }
    if let Some(h) = &info.heartbeat {
        println!(
            "heartbeat   counter={} guest_time={:.3}s cpus_online={} loop_rate={:.0}M/s pvm={}",
            h.counter,
            h.time_ns as f64 / 1e9,
            h.cpus_online,
            h.loop_rate as f64 / 1e6,
            h.pvm
        );
        if format == Format::Wide {
            println!(
                "            ready={} ticks={} dirty_bytes={} per_cpu={:?}",
                h.ready, h.ticks, h.dirty_bytes, h.per_cpu_counter
            );
        }
    }
    if let Some(r) = &info.exit_reason {
        println!("reason      {r}");
    }
    if let Some(a) = &info.api_tcp {
        println!("api_tcp     http://{a} (bearer token: the VM directory's api.token)");
    }
    if format == Format::Wide {
        if let Some(s) = &info.last_snapshot {
            println!("snapshot    {s}");
        }
    }
    Ok(())
}

pub fn status(runtime: &Path, id: &str, out: &OutputArgs) -> anyhow::Result<()> {
    let info: VmInfo = client(runtime, id)?.call("GET", "/vm", None)?;
    print_info(&info, out.format())
}

/// A lifecycle action (`PUT path`): prints `<id> <state>`, or the VM in a structured format.
pub fn action(
    runtime: &Path,
    id: &str,
    path: &str,
    body: Option<Vec<u8>>,
    out: &OutputArgs,
) -> anyhow::Result<()> {
    let info: VmInfo = client(runtime, id)?.call("PUT", path, body)?;
    match out.format() {
        Format::Table => {
            println!("{id} {}", state_name(info.state));
            Ok(())
        }
        f => print_info(&info, f),
    }
}

pub fn events(runtime: &Path, id: &str, out: &OutputArgs) -> anyhow::Result<()> {
    let dir = runtime::vm_dir(runtime, id);
    // A live VMM answers from its ring; an ended one still has its audit file.
    let events: Vec<LifecycleEvent> = match client(runtime, id) {
        Ok(c) => c.call("GET", "/vm/events", None)?,
        Err(e) if dir.join("events.jsonl").is_file() && exit::code_of(&e) != NOT_FOUND => {
            std::fs::read_to_string(dir.join("events.jsonl"))?
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        }
        Err(e) => return Err(e),
    };
    if print_structured(&events, out.format())? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = events
        .into_iter()
        .map(|e| {
            vec![
                e.time_ms.to_string(),
                state_name(e.from),
                state_name(e.to),
                e.cause,
            ]
        })
        .collect();
    print!("{}", table(&["TIME_MS", "FROM", "TO", "CAUSE"], &rows));
    Ok(())
}

/// `ray vm config`: the VM's configuration, as YAML unless JSON is asked for: the
/// document `ray vm run -f` takes.
pub fn config(runtime: &Path, id: &str, out: &OutputArgs) -> anyhow::Result<()> {
    let info: VmInfo = client(runtime, id)?.call("GET", "/vm", None)?;
    let cfg = info.config.ok_or_else(|| {
        coded(
            exit::REFUSED,
            format!(
                "VM '{id}' has no configuration yet (it is {})",
                state_name(info.state)
            ),
        )
    })?;
    let format = match out.format() {
        Format::Json => Format::Json,
        _ => Format::Yaml,
    };
    print_structured(&cfg, format)?;
    Ok(())
}

/// Reads a VM configuration file (`ray vm run -f`): YAML, or JSON (a `.json` file); `-`
/// is standard input.
pub fn read_config_file(path: &Path) -> anyhow::Result<VmConfig> {
    use std::io::Read;
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| {
            coded(
                exit::INVALID,
                format!("cannot read the VM configuration {}: {e}", path.display()),
            )
        })?
    };
    parse_config(&text, path.extension().is_some_and(|e| e == "json")).map_err(|e| {
        coded(
            exit::INVALID,
            format!("invalid VM configuration {}: {e}", path.display()),
        )
    })
}

/// A configuration from JSON or YAML text.
pub fn parse_config(text: &str, json: bool) -> Result<VmConfig, String> {
    if json {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_files_round_trip_in_both_formats() {
        let cfg = VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0 x=\"y z\"".into(),
            vcpus: 3,
            memory_bytes: 256 << 20,
            devices: Default::default(),
            numa: Vec::new(),
            numa_attribution: Default::default(),
            numa_migration: Default::default(),
        };
        let yaml = serde_yaml::to_string(&cfg).unwrap();
        assert_eq!(parse_config(&yaml, false).unwrap(), cfg);
        let json = serde_json::to_string_pretty(&cfg).unwrap();
        assert_eq!(parse_config(&json, true).unwrap(), cfg);
        // YAML reads JSON too; unknown fields are refused, naming them.
        assert_eq!(parse_config(&json, false).unwrap(), cfg);
        let e =
            parse_config("kernel: /k\nvcpus: 1\nmemory_bytes: 1\ncpus: 2\n", false).unwrap_err();
        assert!(e.contains("unknown field `cpus`"), "{e}");
    }
}
