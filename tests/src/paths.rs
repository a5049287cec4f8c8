//! Where the harness finds the workspace, the build tree, the scripts and the rvmm binary.
//!
//! Mirrors `resources/lib.sh`: both must agree on these paths.

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The git-ignored build tree: `$RVMM_BUILD_DIR` or `<workspace>/build`.
pub fn build_dir() -> PathBuf {
    build_dir_from(env::var_os("RVMM_BUILD_DIR").as_deref())
}

/// The scripts: `<workspace>/resources`.
pub fn resources_dir() -> PathBuf {
    workspace_root().join("resources")
}

/// Where console logs of test host runs are saved: `<build>/logs`.
pub fn logs_dir() -> PathBuf {
    build_dir().join("logs")
}

/// Per-run scratch directories (scenario, drive images, initrd): `<build>/run`.
pub fn run_dir() -> PathBuf {
    build_dir().join("run")
}

/// The rvmm binary under test: `$RVMM_BIN`, else `<target>/release/rvmm` where `<target>` is
/// `$CARGO_TARGET_DIR` (relative to the workspace when relative) or `<workspace>/target`.
pub fn rvmm_binary() -> PathBuf {
    rvmm_binary_from(
        env::var_os("RVMM_BIN").as_deref(),
        env::var_os("CARGO_TARGET_DIR").as_deref(),
    )
}

fn build_dir_from(build_dir: Option<&OsStr>) -> PathBuf {
    match build_dir {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("build"),
    }
}

fn rvmm_binary_from(rvmm_bin: Option<&OsStr>, target_dir: Option<&OsStr>) -> PathBuf {
    if let Some(bin) = rvmm_bin.filter(|bin| !bin.is_empty()) {
        return PathBuf::from(bin);
    }
    let target = match target_dir.filter(|dir| !dir.is_empty()) {
        // join keeps an absolute path as it is.
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    };
    target.join("release").join("rvmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rvmm_bin_overrides_the_target_dir() {
        let path = rvmm_binary_from(Some(OsStr::new("/opt/rvmm")), Some(OsStr::new("/t")));

        assert_eq!(path, PathBuf::from("/opt/rvmm"));
    }

    #[test]
    fn absolute_cargo_target_dir_is_used_as_is() {
        let path = rvmm_binary_from(None, Some(OsStr::new("/work/target-x")));

        assert_eq!(path, PathBuf::from("/work/target-x/release/rvmm"));
    }

    #[test]
    fn relative_cargo_target_dir_is_relative_to_the_workspace() {
        let path = rvmm_binary_from(None, Some(OsStr::new("tgt")));

        assert_eq!(path, workspace_root().join("tgt/release/rvmm"));
    }

    #[test]
    fn default_binary_is_in_the_workspace_target_dir() {
        let path = rvmm_binary_from(None, None);

        assert_eq!(path, workspace_root().join("target/release/rvmm"));
    }

    #[test]
    fn default_build_dir_is_in_the_workspace() {
        assert_eq!(build_dir_from(None), workspace_root().join("build"));
    }
}
