//! Building blocks of test host scenarios: shell quoting and one rvmm guest run.
//!
//! A scenario is a busybox `sh` script run by the test host's init with the helpers of
//! `resources/host/host-lib.sh` available (`rvmm_run`, `rvmm_capture`, `vfio_bind`, ...).

use std::fmt::Write as _;

/// Quotes `word` for a POSIX shell (single quotes; embedded ones escaped).
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=./,:+@%".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The kernel an rvmm guest boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestKernel {
    /// Debian's bzImage (`/guest/vmlinuz` in the test host).
    BzImage,
    /// The ELF vmlinux cut out of it, booted through its PVH entry (`/guest/vmlinux`).
    Vmlinux,
    /// Any file in the test host.
    Path(String),
}

impl GuestKernel {
    fn shell_word(&self) -> String {
        match self {
            GuestKernel::BzImage => "\"$GUEST_BZIMAGE\"".to_string(),
            GuestKernel::Vmlinux => "\"$GUEST_VMLINUX\"".to_string(),
            GuestKernel::Path(path) => shell_quote(path),
        }
    }
}

/// One `rvmm run` of the test guest inside the test host, as scenario lines.
///
/// The guest runs its init (`resources/guest/init`) with `rvmm.scenario=<guest scenario>`, prints
/// its `GUEST` markers and powers off; the run is the section `<name>` of the console.
#[derive(Clone, Debug)]
pub struct GuestRun {
    name: String,
    kernel: GuestKernel,
    initramfs: bool,
    guest_scenario: String,
    guest_params: Vec<String>,
    cpus: Option<u32>,
    memory: Option<String>,
    root_ports: Option<u32>,
    extra_args: Vec<String>,
    while_running: Vec<(String, String)>,
    timeout_secs: u32,
}

impl GuestRun {
    /// A run named `name` (its section), booting the bzImage with the guest initramfs, guest
    /// scenario `basic`, serial on stdio, no other options.
    pub fn new(name: &str) -> Self {
        GuestRun {
            name: name.to_string(),
            kernel: GuestKernel::BzImage,
            initramfs: true,
            guest_scenario: "basic".to_string(),
            guest_params: Vec::new(),
            cpus: None,
            memory: None,
            root_ports: None,
            extra_args: Vec::new(),
            while_running: Vec::new(),
            timeout_secs: 180,
        }
    }

    /// The kernel to boot.
    pub fn kernel(mut self, kernel: GuestKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Whether to pass the guest initramfs (default yes).
    pub fn initramfs(mut self, enabled: bool) -> Self {
        self.initramfs = enabled;
        self
    }

    /// The guest init's scenario (`basic`, `hold`, `nvme`, `igbvf`, ...) and its parameters
    /// (`rvmm.hold=8`, ...).
    pub fn guest_scenario(mut self, scenario: &str, params: &[&str]) -> Self {
        self.guest_scenario = scenario.to_string();
        self.guest_params = params.iter().map(|param| (*param).to_string()).collect();
        self
    }

    /// `--cpus N`.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// `--memory SPEC`, e.g. `size=512M,hugepages=on`.
    pub fn memory(mut self, spec: &str) -> Self {
        self.memory = Some(spec.to_string());
        self
    }

    /// `--root-ports N`.
    pub fn root_ports(mut self, ports: u32) -> Self {
        self.root_ports = Some(ports);
        self
    }

    /// More rvmm arguments, quoted for the shell.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(shell_quote(arg));
        self
    }

    /// One more rvmm argument written into the scenario as the shell word `word`, unquoted, so
    /// that it can expand scenario variables: `.shell_arg("\"path=/sys/bus/pci/devices/$NVME\"")`.
    pub fn shell_arg(mut self, word: &str) -> Self {
        self.extra_args.push(word.to_string());
        self
    }

    /// Scenario lines to run once the guest's console shows `text` (e.g. `GUEST hold `), while
    /// rvmm still runs; `$RVMM_RUN` holds the run's name for the helpers.
    pub fn while_running(mut self, text: &str, commands: &str) -> Self {
        self.while_running
            .push((text.to_string(), commands.to_string()));
        self
    }

    /// Seconds after which the test host kills rvmm (default 180).
    pub fn timeout_secs(mut self, secs: u32) -> Self {
        self.timeout_secs = secs;
        self
    }

    /// The run's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rvmm command line, as shell words (kernel and initramfs as test host variables).
    pub fn rvmm_args(&self) -> String {
        let mut words = vec![
            "run".to_string(),
            "--kernel".to_string(),
            self.kernel.shell_word(),
        ];
        if self.initramfs {
            words.push("--initramfs".to_string());
            words.push("\"$GUEST_INITRAMFS\"".to_string());
        }
        let mut cmdline = format!("$(guest_cmdline {}", shell_quote(&self.guest_scenario));
        for param in &self.guest_params {
            cmdline.push(' ');
            cmdline.push_str(&shell_quote(param));
        }
        cmdline.push(')');
        words.push("--cmdline".to_string());
        words.push(format!("\"{cmdline}\""));
        if let Some(cpus) = self.cpus {
            words.push("--cpus".to_string());
            words.push(cpus.to_string());
        }
        if let Some(memory) = &self.memory {
            words.push("--memory".to_string());
            words.push(shell_quote(memory));
        }
        if let Some(ports) = self.root_ports {
            words.push("--root-ports".to_string());
            words.push(ports.to_string());
        }
        words.push("--serial".to_string());
        words.push("stdio".to_string());
        words.extend(self.extra_args.iter().cloned());
        words.join(" ")
    }

    /// The scenario lines of this run.
    pub fn script(&self) -> String {
        let name = shell_quote(&self.name);
        let mut script = format!("RVMM_TIMEOUT={}\nRVMM_RUN={name}\n", self.timeout_secs);
        if self.while_running.is_empty() {
            let _ = writeln!(script, "rvmm_run {name} {}", self.rvmm_args());
            return script;
        }
        let _ = writeln!(script, "rvmm_start {name} {}", self.rvmm_args());
        for (text, commands) in &self.while_running {
            let _ = writeln!(
                script,
                "if rvmm_wait_output {name} {} {}; then\n{commands}\nfi",
                shell_quote(text),
                self.timeout_secs
            );
        }
        let _ = writeln!(script, "rvmm_wait {name}");
        script
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words_are_not_quoted() {
        assert_eq!(
            shell_quote("size=512M,hugepages=on"),
            "size=512M,hugepages=on"
        );
    }

    #[test]
    fn words_with_spaces_or_quotes_are_single_quoted() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn default_run_boots_the_bzimage_with_the_initramfs_on_serial_stdio() {
        let args = GuestRun::new("x").rvmm_args();

        assert_eq!(
            args,
            "run --kernel \"$GUEST_BZIMAGE\" --initramfs \"$GUEST_INITRAMFS\" \
             --cmdline \"$(guest_cmdline basic)\" --serial stdio"
        );
    }

    #[test]
    fn options_appear_in_the_rvmm_command_line() {
        let args = GuestRun::new("x")
            .kernel(GuestKernel::Vmlinux)
            .guest_scenario("hold", &["rvmm.hold=8"])
            .cpus(2)
            .memory("size=512M")
            .root_ports(4)
            .arg("--api-socket")
            .arg("/tmp/a b")
            .rvmm_args();

        assert!(args.starts_with("run --kernel \"$GUEST_VMLINUX\""));
        assert!(args.contains("--cmdline \"$(guest_cmdline hold rvmm.hold=8)\""));
        assert!(args.contains("--cpus 2 --memory size=512M --root-ports 4 --serial stdio"));
        assert!(args.ends_with("--api-socket '/tmp/a b'"));
    }

    #[test]
    fn shell_args_are_written_unquoted_after_quoted_ones() {
        let args = GuestRun::new("x")
            .arg("--device")
            .shell_arg("\"$NVME0,id=disk0\"")
            .rvmm_args();

        assert!(args.ends_with("--serial stdio --device \"$NVME0,id=disk0\""));
    }

    #[test]
    fn run_without_actions_uses_rvmm_run() {
        let script = GuestRun::new("boot").timeout_secs(60).script();

        assert!(script.starts_with("RVMM_TIMEOUT=60\nRVMM_RUN=boot\nrvmm_run boot run "));
    }

    #[test]
    fn actions_run_between_start_and_wait() {
        let script = GuestRun::new("boot")
            .while_running("GUEST hold ", "rvmm_report_process boot")
            .script();

        let start = script.find("rvmm_start boot");
        let action = script
            .find("rvmm_wait_output boot 'GUEST hold ' 180; then\nrvmm_report_process boot\nfi");
        let wait = script.find("rvmm_wait boot");
        assert!(start < action && action < wait, "{script}");
        assert!(start.is_some());
    }
}
