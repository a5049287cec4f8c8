//! Runs `resources/prepare-images.sh` (kernel, guest and test host initramfs, each cached on
//! its inputs) once per test process, before the first test host run.

use std::process::Command;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::paths;

/// The outcome of the one preparation of this process, as (script, status, output) on failure.
static PREPARED: OnceLock<std::result::Result<(), (String, String, String)>> = OnceLock::new();

/// Makes sure the kernel and the images are built for the rvmm binary under test.
pub(crate) fn prepare_images() -> Result<()> {
    let outcome = PREPARED.get_or_init(run_prepare);
    outcome
        .clone()
        .map_err(|(script, status, output)| Error::Prepare {
            script,
            status,
            output,
        })
}

fn run_prepare() -> std::result::Result<(), (String, String, String)> {
    let script = paths::resources_dir().join("prepare-images.sh");
    let display = script.display().to_string();
    let result = Command::new("bash")
        .arg(&script)
        .env("RVMM_BIN", paths::rvmm_binary())
        .env("RVMM_BUILD_DIR", paths::build_dir())
        .output();
    match result {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            Err((display, output.status.to_string(), text))
        }
        Err(error) => Err((display, "not started".to_string(), error.to_string())),
    }
}
