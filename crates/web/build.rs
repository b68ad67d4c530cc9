//! Embeds the browser libraries `ray web` serves (noVNC's ES modules, xterm.js) from
//! `web/node_modules`, which `scripts/setup` installs with `npm ci`: nothing is fetched at
//! run time and no CDN is used.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// (directory under node_modules, URL prefix, file suffixes to embed)
const TREES: &[(&str, &str, &[&str])] = &[
    ("@novnc/novnc/core", "/vendor/novnc/core", &[".js"]),
    ("@novnc/novnc/vendor", "/vendor/novnc/vendor", &[".js"]),
    ("@xterm/xterm/lib", "/vendor/xterm/lib", &["xterm.js"]),
    ("@xterm/xterm/css", "/vendor/xterm/css", &[".css"]),
];

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let modules = manifest.join("../../web/node_modules");
    println!(
        "cargo:rerun-if-changed={}",
        modules.join(".package-lock.json").display()
    );
    let mut files = Vec::new();
    for (dir, prefix, suffixes) in TREES {
        let root = modules.join(dir);
        if !root.is_dir() {
            panic!(
                "{} is missing: run scripts/setup (it runs `npm ci` in web/) before building ray-web",
                root.display()
            );
        }
        collect(&root, &root, prefix, suffixes, &mut files);
    }
    files.sort();
    let mut out = String::from("/// Files from web/node_modules: (URL path, contents).\n");
    out.push_str("pub static VENDOR: &[(&str, &[u8])] = &[\n");
    for (url, path) in &files {
        writeln!(
            out,
            "    ({url:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("writing to a String cannot fail");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("vendor.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}

fn collect(
    root: &Path,
    dir: &Path,
    prefix: &str,
    suffixes: &[&str],
    out: &mut Vec<(String, PathBuf)>,
) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            collect(root, &path, prefix, suffixes, out);
        } else if suffixes.iter().any(|s| path.to_string_lossy().ends_with(s)) {
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let path = path
                .canonicalize()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((format!("{prefix}/{rel}"), path));
        }
    }
}
