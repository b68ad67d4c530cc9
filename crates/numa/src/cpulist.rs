//! The kernel's list format for sets of small numbers: `0-3,8,10-11` (sysfs `cpulist`,
//! `online`, `has_memory`; taskset; QEMU's `-numa cpus=`). An empty string is the empty set.

/// A list that is not in the kernel's format; the message names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is not a list like 0-3,8: {reason} in {text:?}")]
pub struct ListError {
    what: &'static str,
    text: String,
    reason: String,
}

/// Parses `text` (what it is: `what`, for the message) into ascending, distinct numbers.
pub fn parse_list(what: &'static str, text: &str) -> Result<Vec<u32>, ListError> {
    let err = |reason: String| ListError {
        what,
        text: text.to_string(),
        reason,
    };
    let mut out = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Ok(out);
    }
    for part in text.split(',') {
        let num = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| err(format!("{s:?} is not a number")))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(err(format!("range {part:?} runs backwards")));
        }
        if hi - lo >= 1 << 20 {
            return Err(err(format!("range {part:?} is implausibly large")));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    let before = out.len();
    out.dedup();
    if out.len() != before {
        return Err(err("a number appears twice".to_string()));
    }
    Ok(out)
}

/// The shortest list form of `items` (sorted or not): consecutive runs become `a-b`.
pub fn format_list(items: &[u32]) -> String {
    let mut v = items.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_lists_parse() {
        assert_eq!(parse_list("cpus", "0-1").unwrap(), vec![0, 1]);
        assert_eq!(
            parse_list("cpus", "0-2,5,7-8\n").unwrap(),
            vec![0, 1, 2, 5, 7, 8]
        );
        assert_eq!(parse_list("cpus", "").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_list("cpus", "\n").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn bad_lists_name_the_part() {
        assert_eq!(
            parse_list("cpus", "0-x").unwrap_err().to_string(),
            "cpus is not a list like 0-3,8: \"x\" is not a number in \"0-x\""
        );
        assert!(parse_list("cpus", "3-1")
            .unwrap_err()
            .to_string()
            .contains("backwards"));
        assert!(parse_list("cpus", "1,1")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(parse_list("cpus", "0-4000000000").is_err());
        assert!(parse_list("cpus", ",").is_err());
    }

    proptest! {
        #[test]
        fn format_then_parse_is_the_set(set in proptest::collection::btree_set(0u32..300, 0..40)) {
            let v: Vec<u32> = set.into_iter().collect();
            prop_assert_eq!(parse_list("x", &format_list(&v)).unwrap(), v);
        }

        #[test]
        fn parse_never_panics(s in "[0-9,\\- ]{0,20}") {
            let _ = parse_list("x", &s);
        }
    }
}
