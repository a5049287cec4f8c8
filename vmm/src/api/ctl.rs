//! `rvmm ctl`: the command-line client of a running VM's control API. Answers are printed as
//! pretty JSON on stdout, events as JSON lines; errors go to stderr through the caller.

use std::io::{self, Write};
use std::path::PathBuf;

use crate::api::client::{ApiClient, ClientError};
use crate::api::types::{RemoveDeviceRequest, DEFAULT_REMOVE_TIMEOUT_MS, MAX_REMOVE_TIMEOUT_MS};
use crate::device::DeviceId;
use crate::device::DeviceSpec;
use rvmm_devices::error_chain;

/// Help text of the add-device argument.
const DEVICE_HELP: &str = "path=HOST_DEVICE[,id=NAME][,group-fd=N] or \
    vf=PF[,id=NAME][,mac=MAC][,vlan=N][,trust=on|off][,spoofchk=on|off]; group-fd=N sends this \
    process's descriptor N (the device's open /dev/vfio/GROUP) with the request";

/// `rvmm ctl` arguments.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The VM's API socket (as given to `rvmm run --api-socket`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `rvmm ctl` verbs.
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Print the configuration and every passthrough device.
    Info,
    /// Hot-add one device; prints it once the guest has it.
    AddDevice {
        /// The device, in the form of [`crate::api::device_arg`].
        #[arg(
            value_name = "DEVICE",
            value_parser = parse_device,
            help = DEVICE_HELP,
            long_help = DEVICE_HELP
        )]
        device: DeviceSpec,
    },
    /// Hot-remove a device; prints how the removal ended once it is released.
    RemoveDevice {
        /// The device id.
        id: DeviceId,
        /// Remove at once, without asking the guest.
        #[arg(long)]
        surprise: bool,
        /// How long the guest gets to release the device before a surprise removal.
        #[arg(
            long,
            value_name = "N",
            default_value_t = DEFAULT_REMOVE_TIMEOUT_MS,
            value_parser = clap::value_parser!(u64).range(1..=MAX_REMOVE_TIMEOUT_MS)
        )]
        timeout_ms: u64,
    },
    /// Print events as JSON lines until the VM ends.
    Events,
    /// Attach to the VM's socket console (`rvmm run --serial socket=PATH`, found in its info).
    /// On a terminal: raw mode, Ctrl-] detaches. Otherwise stdin is copied to the console and
    /// the console to stdout until stdin ends or the console closes.
    Console,
    /// Stop the VM.
    Shutdown,
    /// Print the counters: KVM exits per vCPU, interrupts and DMA-mapped bytes per device,
    /// hotplug operations, memory, uptime, reboots.
    Counters,
    /// Pause the VM: returns once every vCPU is stopped. Hotplug requests are refused until
    /// a resume; passthrough devices keep doing DMA.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Press the VM's ACPI power button (returns once it is pressed; the guest then shuts down
    /// the way it was configured to).
    PowerButton,
    /// Reset the VM as a guest reset does: with `--on-reboot restart` it reboots in place
    /// (devices, VF leases and the API kept), with `exit` rvmm ends. Refused while paused.
    Reboot,
    /// Send one request as given to any path of the socket (rvmm's /v1/... or Cloud
    /// Hypervisor's /api/v1/...) and print `HTTP <status>` and the body on one line; exits 1
    /// when the status is not 2xx.
    Raw {
        /// GET or PUT.
        method: String,
        /// The path, e.g. /api/v1/vm.info.
        path: String,
        /// The JSON body, if any.
        body: Option<String>,
    },
}

/// How long `rvmm ctl raw` waits for an answer (a hot-add waits for the guest, a create for
/// guest RAM to be prefaulted).
const RAW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// `rvmm ctl raw`: the status and the body (compact JSON when it is JSON) on one line.
fn raw(
    client: &ApiClient,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(), ClientError> {
    let answer = client.request(method, path, body.map(str::as_bytes), RAW_TIMEOUT)?;
    let text = match serde_json::from_slice::<serde_json::Value>(&answer.body) {
        Ok(value) => value.to_string(),
        Err(_) => String::from_utf8_lossy(&answer.body).trim().to_owned(),
    };
    let line = if text.is_empty() {
        format!("HTTP {}", answer.status)
    } else {
        format!("HTTP {} {text}", answer.status)
    };
    print_line(&line)?;
    if (200..300).contains(&answer.status) {
        Ok(())
    } else {
        Err(ClientError::Api {
            status: answer.status,
            message: format!("{method} {path} was refused"),
        })
    }
}

/// Parses a device argument, keeping the whole chain of causes in the message clap prints.
fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse::<DeviceSpec>().map_err(|e| error_chain(&e))
}

/// Writes `text` and a newline to stdout; a closed stdout (e.g. `| head`) is not an error.
fn print_line(text: &str) -> Result<bool, ClientError> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(source) => Err(ClientError::Io {
            what: "write to stdout",
            source,
        }),
    }
}

/// Prints a JSON answer pretty; an empty answer prints nothing.
fn print_json(body: &[u8]) -> Result<(), ClientError> {
    if body.is_empty() {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(ClientError::Decode)?;
    let text = serde_json::to_string_pretty(&value).map_err(ClientError::Decode)?;
    print_line(&text).map(drop)
}

/// Runs one `rvmm ctl` command.
pub fn run(args: CtlArgs) -> Result<(), ClientError> {
    let client = ApiClient::new(&args.api_socket);
    match args.command {
        CtlCommand::Info => print_json(&client.info_raw()?.body),
        CtlCommand::AddDevice { device } => print_json(&client.add_device_raw(&device)?.body),
        CtlCommand::RemoveDevice {
            id,
            surprise,
            timeout_ms,
        } => {
            let req = RemoveDeviceRequest {
                id,
                surprise,
                timeout_ms,
            };
            print_json(&client.remove_device_raw(&req)?.body)
        }
        CtlCommand::Events => {
            let mut stream = client.events()?;
            while let Some(line) = stream.next_line()? {
                if !print_line(&line)? {
                    break;
                }
            }
            Ok(())
        }
        CtlCommand::Shutdown => client.shutdown(),
        CtlCommand::Counters => print_json(&client.counters_raw()?.body),
        CtlCommand::Pause => client.pause(),
        CtlCommand::Resume => client.resume(),
        CtlCommand::Raw { method, path, body } => raw(&client, &method, &path, body.as_deref()),
        CtlCommand::PowerButton => client.power_button(),
        CtlCommand::Reboot => client.reboot(),
        CtlCommand::Console => crate::api::ctl_console::run(&client),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).map(|c| c.ctl)
    }

    #[test]
    fn remove_device_defaults_to_ten_seconds_graceful() {
        let args = parse(&["--api-socket", "/tmp/s", "remove-device", "nvme0"]).expect("valid");
        match args.command {
            CtlCommand::RemoveDevice {
                surprise,
                timeout_ms,
                ..
            } => {
                assert!(!surprise);
                assert_eq!(timeout_ms, DEFAULT_REMOVE_TIMEOUT_MS);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn remove_device_takes_surprise_and_timeout() {
        let args = parse(&[
            "--api-socket",
            "/tmp/s",
            "remove-device",
            "nvme0",
            "--surprise",
            "--timeout-ms",
            "500",
        ])
        .expect("valid");
        assert!(matches!(
            args.command,
            CtlCommand::RemoveDevice {
                surprise: true,
                timeout_ms: 500,
                ..
            }
        ));
    }

    #[test]
    fn add_device_parses_the_device_string() {
        let args = parse(&[
            "--api-socket",
            "/tmp/s",
            "add-device",
            "path=01:00.0,id=nvme0",
        ])
        .expect("valid");
        assert!(matches!(args.command, CtlCommand::AddDevice { .. }));
    }

    #[test]
    fn invalid_device_string_is_a_usage_error_with_the_cause() {
        let err = parse(&[
            "--api-socket",
            "/tmp/s",
            "add-device",
            "vf=enp1s0,mac=01:00:00:00:00:00",
        ])
        .expect_err("multicast MAC");
        let text = err.to_string();
        assert!(
            text.contains("invalid mac: MAC address 01:00:00:00:00:00 cannot be given"),
            "{text}"
        );
    }

    #[test]
    fn invalid_device_id_is_a_usage_error() {
        assert!(parse(&["--api-socket", "/tmp/s", "remove-device", "a/b"]).is_err());
    }

    #[test]
    fn zero_timeout_is_a_usage_error() {
        assert!(parse(&[
            "--api-socket",
            "/tmp/s",
            "remove-device",
            "a",
            "--timeout-ms",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn counters_is_a_verb_without_arguments() {
        let args = parse(&["--api-socket", "/tmp/s", "counters"]).expect("valid");
        assert!(matches!(args.command, CtlCommand::Counters));
        assert!(parse(&["--api-socket", "/tmp/s", "counters", "x"]).is_err());
    }

    #[test]
    fn pause_and_resume_are_verbs() {
        let pause = parse(&["--api-socket", "/tmp/s", "pause"]).expect("valid");
        let resume = parse(&["--api-socket", "/tmp/s", "resume"]).expect("valid");
        assert!(matches!(pause.command, CtlCommand::Pause));
        assert!(matches!(resume.command, CtlCommand::Resume));
    }

    #[test]
    fn power_button_is_a_verb() {
        let args = parse(&["--api-socket", "/tmp/s", "power-button"]).expect("valid");
        assert!(matches!(args.command, CtlCommand::PowerButton));
    }

    #[test]
    fn missing_socket_is_a_usage_error() {
        assert!(parse(&["info"]).is_err());
    }
}
