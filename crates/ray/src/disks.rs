//! `ray vm run --disk PATH[,ro][,direct][,id=ID][,rate=BYTES][,iops=N][,engine=pool|uring]`:
//! one virtio-blk disk.
use ray_api::vmm::{DiskConfig, DiskEngine};

use crate::sizes::parse_size;

pub const SYNTAX: &str = "PATH[,ro][,direct][,id=ID][,rate=BYTES/s][,iops=N][,engine=pool|uring]";

/// Parses one `--disk` value. The id is left empty when not given: [`number`] names the
/// disks `disk0`, `disk1`, ... in order. The path is made absolute (the VMM runs
/// elsewhere).
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!("'{text}' names no file: the syntax is {SYNTAX}"));
    }
    let path = std::path::absolute(path)
        .map_err(|e| format!("cannot make '{path}' an absolute path: {e}"))?;
    let mut disk = DiskConfig {
        id: String::new(),
        path: path.display().to_string(),
        readonly: false,
        direct: false,
        rate_bytes: None,
        rate_ops: None,
        engine: DiskEngine::default(),
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.readonly = true,
            None if opt == "direct" => disk.direct = true,
            Some(("id", v)) => disk.id = v.to_string(),
            Some(("rate", v)) => {
                let v = v.strip_suffix("/s").unwrap_or(v);
                let bytes = parse_size(v).map_err(|e| format!("rate={v}: {e}"))?;
                if bytes == 0 {
                    return Err("rate=0: a rate limit must be above zero".into());
                }
                disk.rate_bytes = Some(bytes);
            }
            Some(("engine", v)) => disk.engine = DiskEngine::parse(v)?,
            Some(("iops", v)) => {
                let ops: u64 = v
                    .parse()
                    .map_err(|_| format!("iops={v}: not a whole number of requests per second"))?;
                if ops == 0 {
                    return Err("iops=0: a rate limit must be above zero".into());
                }
                disk.rate_ops = Some(ops);
            }
            _ => {
                return Err(format!(
                    "unknown disk option '{opt}' in '{text}': the syntax is {SYNTAX}"
                ))
            }
        }
    }
    Ok(disk)
}

/// Names the disks without an id `disk<N>` by their position.
pub fn number(disks: &mut [DiskConfig]) {
    for (i, d) in disks.iter_mut().enumerate() {
        if d.id.is_empty() {
            d.id = format!("disk{i}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_bad_ones_are_named() {
        let d = parse_disk("/tmp/a.img,ro,direct,id=data,rate=50M,iops=1000").unwrap();
        assert_eq!(d.path, "/tmp/a.img");
        assert!(d.readonly && d.direct);
        assert_eq!(d.id, "data");
        assert_eq!(d.rate_bytes, Some(50 << 20));
        assert_eq!(d.rate_ops, Some(1000));
        assert_eq!(d.engine, DiskEngine::default());
        assert_eq!(
            parse_disk("a,engine=uring").unwrap().engine,
            DiskEngine::Uring
        );
        assert_eq!(
            parse_disk("a,engine=pool").unwrap().engine,
            DiskEngine::Pool
        );
        assert_eq!(
            parse_disk("a,engine=aio").unwrap_err(),
            "engine=aio: the disk engines are pool and uring"
        );
        let d = parse_disk("b.img").unwrap();
        assert!(d.path.starts_with('/') && d.path.ends_with("/b.img"));
        assert!(!d.readonly && d.id.is_empty());
        let mut v = vec![d.clone(), parse_disk("c.img,id=x").unwrap(), d];
        number(&mut v);
        let ids: Vec<&str> = v.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["disk0", "x", "disk2"]);

        assert!(parse_disk("").unwrap_err().contains("names no file"));
        assert!(parse_disk("a,rw")
            .unwrap_err()
            .contains("unknown disk option 'rw'"));
        assert!(parse_disk("a,rate=fast")
            .unwrap_err()
            .starts_with("rate=fast"));
        assert!(parse_disk("a,iops=0").unwrap_err().contains("above zero"));
    }
}
