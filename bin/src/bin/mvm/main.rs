//! `mvm`: create, start, stop and enter microvm-dev VMs.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use mvm::agent::{ExecRequest, Tty};
use mvm::image::{ImageSpec, Progress};
use mvm::manager::{direnv, export_lines, EnvArg, SessionSettings};
use mvm::manager::{parse_host_port, NetworkChoice, PortSpec, RootChoice, UserChoice};
use mvm::manager::{CONSOLE_LOG, DEFAULT_STOP_TIMEOUT};
use mvm::term;
use mvm::{CreateOptions, Error, ImageInfo, Manager, StartOptions, StartOutcome, VmInfo, VmState, VolumeSpec};

const EXIT_HELP: &str = "\
Exit status: 0 success; 2 usage or configuration error (bad name, unknown VM,
bad project path, invalid vm.toml); 1 any other error. `exec` and `shell`
exit with the guest program's status (128+N if signal N killed it).

Environment: MVM_STATE_DIR (state directory, default /var/lib/microvm-dev),
MVM_KERNEL / MVM_INITRD (default guest kernel and initramfs for `create`),
MVM_IMAGE_DIR (root file system images, default <state dir>/images),
MVM_VMM (the mvm-vmm program), MVM_LOG (mvm-vmm's log level).";

#[derive(Parser)]
#[command(
    name = "mvm",
    version,
    about = "Create, start, stop and enter microvm-dev VMs",
    after_help = EXIT_HELP
)]
struct Cli {
    /// State directory holding the VMs (overrides MVM_STATE_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once per run: the size of `Create` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Define a new VM (writes <state dir>/<name>/vm.toml; does not start it).
    #[command(after_help = EXIT_HELP)]
    Create {
        /// VM name: lowercase letters, digits and '-', at most 32 characters.
        name: String,
        /// Host directory the guest sees at /project; the guest's changes
        /// go to an overlay in the VM, never to this directory.
        #[arg(long, value_name = "DIR")]
        project: Option<PathBuf>,
        /// Number of vCPUs [default: 2].
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// Guest memory in MiB [default: 256].
        #[arg(long, value_name = "MiB")]
        memory: Option<u32>,
        /// Keep the guest's changes to /project across restarts.
        #[arg(long)]
        persist: bool,
        /// A persistent ext4 volume: name:size_mib[:mount], e.g. data:1024:/data.
        #[arg(long, value_name = "NAME:SIZE:MOUNT")]
        volume: Vec<String>,
        /// Start from this vm.toml (its machine, boot and other keys are kept).
        #[arg(long, value_name = "VM.TOML")]
        from: Option<PathBuf>,
        /// Guest kernel [default: $MVM_KERNEL, else <state dir>/guest/vmlinux].
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        /// Initramfs whose init is mvm-agent [default: $MVM_INITRD, else
        /// <state dir>/guest/initramfs.cpio].
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// Root file system image: a name from `mvm image list`, <name>-<id>,
        /// an id, or an ext4 file [default: the image "default", built
        /// first if missing].
        #[arg(long, value_name = "IMAGE", conflicts_with = "no_image")]
        image: Option<String>,
        /// No image: the initramfs alone is the guest's system.
        #[arg(long)]
        no_image: bool,
        /// Keep the guest's changes to the root file system in memory only:
        /// each start begins from the image.
        #[arg(long)]
        ephemeral: bool,
        /// Size in MiB of the volume that keeps the root's changes [default:
        /// 8192; sparse].
        #[arg(long, value_name = "MiB", conflicts_with = "ephemeral")]
        root_size: Option<u64>,
        /// The managed network to join [default: "default": bridge
        /// virbr-mvm, 10.213.0.0/24, DHCP, DNS, NAT].
        #[arg(long, value_name = "NAME", conflicts_with = "no_network")]
        network: Option<String>,
        /// No managed network (no NIC unless a --from file has one).
        #[arg(long)]
        no_network: bool,
        /// Forward a host port to the guest: [ADDRESS:]HOST:GUEST[/udp]
        /// (ADDRESS defaults to 127.0.0.1); repeatable.
        #[arg(long, value_name = "SPEC")]
        forward: Vec<String>,
        /// The guest user `shell` and `exec` run as: NAME[:UID[:GID]] (a
        /// missing uid or gid is the host account's), or "root" for none
        /// [default: you (under sudo, who ran sudo); as root, the project
        /// directory's owner unless that is root].
        #[arg(long, value_name = "NAME[:UID[:GID]]")]
        user: Option<String>,
        /// Set a variable in every `shell`/`exec` session ([env].set);
        /// repeatable.
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Copy host variables matching PATTERN (`*`: any text, e.g.
        /// GITHUB_*) into sessions at exec time ([env].passthrough; values
        /// are never stored); repeatable.
        #[arg(long = "pass-env", value_name = "PATTERN")]
        pass_env: Vec<String>,
        /// Run a server from Debian's packages in the VM, its data on the
        /// `services` volume, forwarded from 127.0.0.1 on the host (the same
        /// port, or the next free one): KIND[:PORT][:DB,DB...] with KIND
        /// postgresql, redis or mariadb, e.g. postgresql:5432:app; repeatable.
        #[arg(long, value_name = "KIND[:PORT][:DBS]")]
        service: Vec<String>,
        /// Run the VMM as this host user when mvm runs as root ([security]
        /// user): root prepares the TAP, virtiofsd and /dev/kvm, the VMM
        /// runs with no capabilities [default: microvm-dev, which
        /// scripts/setup-host.sh creates; "root" keeps root's rights].
        #[arg(long, value_name = "USER")]
        vmm_user: Option<String>,
        /// Do not read the project's devenv.nix (by default its services
        /// and env.* are taken: docs/devenv.md).
        #[arg(long)]
        no_devenv: bool,
    },
    /// Forward host ports to a VM at run time (kept across restarts):
    /// mvm port web 8080:80, mvm port web --rm 8080, mvm port web --list
    #[command(after_help = EXIT_HELP)]
    Port {
        name: String,
        /// [ADDRESS:]HOST:GUEST[/udp]; ADDRESS defaults to 127.0.0.1.
        #[arg(value_name = "SPEC", required_unless_present_any = ["rm", "list"], conflicts_with_all = ["rm", "list"])]
        spec: Option<String>,
        /// Remove the run-time forward of host port PORT[/udp].
        #[arg(long, value_name = "PORT")]
        rm: Option<String>,
        /// List the VM's forwards.
        #[arg(long, conflicts_with = "rm")]
        list: bool,
        /// With --list: print a JSON array.
        #[arg(long, requires = "list")]
        json: bool,
    },
    /// Managed networks: bridge, DHCP and DNS (dnsmasq), NAT (nftables).
    #[command(subcommand, after_help = EXIT_HELP)]
    Network(NetworkCmd),
    /// Root file system images: build, list, remove.
    #[command(subcommand, after_help = EXIT_HELP)]
    Image(ImageCmd),
    /// Start a VM and wait until its guest agent answers.
    #[command(after_help = EXIT_HELP)]
    Start {
        name: String,
        /// Seconds to wait for the guest.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
    /// Stop a VM: power off through its agent, else SIGTERM, else SIGKILL.
    #[command(after_help = EXIT_HELP)]
    Stop {
        name: String,
        /// Seconds to wait for the power-off before SIGTERM (the agent
        /// first stops the VM's services cleanly).
        #[arg(long, value_name = "SECS", default_value_t = DEFAULT_STOP_TIMEOUT.as_secs())]
        timeout: u64,
    },
    /// Stop a VM if it runs, then start it.
    #[command(after_help = EXIT_HELP)]
    Restart {
        name: String,
        /// Seconds to wait for the guest after the start.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
    /// Remove a VM and its state (overlay, volumes, logs); never the project.
    #[command(after_help = EXIT_HELP)]
    Rm {
        name: String,
        /// Kill the VM first if it runs.
        #[arg(long, short)]
        force: bool,
    },
    /// List the VMs.
    #[command(after_help = EXIT_HELP)]
    List {
        /// Print a JSON array of objects (fields as in docs/manager.md).
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    #[command(after_help = EXIT_HELP)]
    Status {
        name: String,
        /// Print a JSON object (fields as in docs/manager.md).
        #[arg(long)]
        json: bool,
    },
    /// Print the guest console output.
    #[command(after_help = EXIT_HELP)]
    Logs {
        name: String,
        /// Keep printing new output (like tail -f) until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
    },
    /// An interactive login shell in the guest, as the VM's user.
    #[command(after_help = EXIT_HELP)]
    Shell {
        name: String,
        /// As root instead of the VM's user.
        #[arg(long)]
        root: bool,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Run a program in the guest: mvm exec <name> -- <program> [args...]
    #[command(after_help = EXIT_HELP)]
    Exec {
        name: String,
        /// Forward standard input even when it is a terminal.
        #[arg(short, long)]
        interactive: bool,
        /// Run the program on a pseudo-terminal.
        #[arg(short, long)]
        tty: bool,
        /// As root instead of the VM's user.
        #[arg(long)]
        root: bool,
        #[command(flatten)]
        session: SessionArgs,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Show what a VM changed in its project as a patch in git's format
    /// (git apply takes it), or a summary with --stat.
    Diff {
        name: String,
        /// A `git diff --stat`-like summary instead of the patch.
        #[arg(long)]
        stat: bool,
        /// Only changes at or below these paths (relative to the project).
        paths: Vec<PathBuf>,
    },
    /// Write a VM's changes into the project directory; refused (nothing
    /// written) when a host file changed since the VM took it.
    #[command(
        after_help = "A conflict exits with status 1 and lists the paths; resolve each (restore the host file, or `mvm reset <name> <path>`) and apply again."
    )]
    Apply {
        name: String,
        /// Only report what would be applied and the conflicts.
        #[arg(long)]
        check: bool,
        /// Only changes at or below these paths (relative to the project).
        paths: Vec<PathBuf>,
    },
    /// Drop a VM's changes to its project (all, or at or below the paths):
    /// the VM sees the host's files there again.
    Reset {
        name: String,
        /// Paths relative to the project.
        paths: Vec<PathBuf>,
    },
    /// Print the host-side variables of a VM as shell `export` lines
    /// (MVM_VM, MVM_PROJECT, its services'): eval "$(mvm env web)"
    #[command(after_help = EXIT_HELP)]
    Env {
        name: String,
        /// Print a JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// direnv integration: `mvm direnv init` writes the project's .envrc
    /// (`use mvm`, `mvm_run CMD...`) and installs the `use_mvm` library.
    #[command(subcommand, after_help = EXIT_HELP)]
    Direnv(DirenvCmd),
    /// Print a shell completion script: mvm completions bash > /etc/bash_completion.d/mvm
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Environment and working directory of a `shell`/`exec` session.
#[derive(clap::Args)]
struct SessionArgs {
    /// Set a variable in the session: NAME=VALUE, or NAME to copy mvm's
    /// own; wins over [env] and passed-through host variables; repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]")]
    env: Vec<OsString>,
    /// Guest working directory; a relative one is relative to the project
    /// mount (/project) [default: /project, else the user's home].
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DirenvCmd {
    /// Write DIR/.envrc (`use mvm`, and `mvm_run` for --run commands) and
    /// install the library that defines `use_mvm` and `mvm_run` in
    /// ${XDG_CONFIG_HOME:-~/.config}/direnv/lib/mvm.sh. Then `direnv allow DIR`.
    Init(DirenvInit),
    /// Print the direnv library (use_mvm, mvm_run).
    Lib,
    /// For `use mvm`: find, create or start the project's VM, and print
    /// shell code for direnv's bash.
    #[command(hide = true)]
    Hook {
        #[arg(long, value_name = "DIR")]
        layout_dir: PathBuf,
        #[arg(long, value_name = "VM")]
        name: Option<String>,
        dir: PathBuf,
    },
    /// For `mvm_run`: write shims into DIR.
    #[command(hide = true)]
    Shim {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        project: Option<PathBuf>,
        vm: String,
        #[arg(last = true, required = true)]
        commands: Vec<String>,
    },
    /// Create VM NAME for --project if missing, then start it (what `use
    /// mvm` runs in the background).
    #[command(hide = true)]
    Up {
        name: String,
        #[arg(long, value_name = "DIR")]
        project: Option<PathBuf>,
    },
}

/// What `mvm direnv init` and `create-microvm-env` take.
#[derive(Args)]
struct DirenvInit {
    /// The project directory [default: the current one].
    dir: Option<PathBuf>,
    /// Use this VM [default: the VM whose project is DIR, else a new one
    /// named after DIR].
    #[arg(long, value_name = "VM")]
    name: Option<String>,
    /// A command that runs in the VM when typed in the project (a shim on
    /// PATH); repeatable.
    #[arg(long, value_name = "CMD")]
    run: Vec<String>,
    /// Replace an existing .envrc.
    #[arg(long)]
    force: bool,
}

/// `create-microvm-env`: `mvm direnv init` under its own name.
#[derive(Parser)]
#[command(
    name = "create-microvm-env",
    version,
    about = "Set up direnv for a project: write DIR/.envrc (`use mvm`) and install the use_mvm library; the same as `mvm direnv init`"
)]
struct CreateEnvCli {
    #[command(flatten)]
    init: DirenvInit,
    /// State directory holding the VMs (overrides MVM_STATE_DIR).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// `mvm-devenv`: a VM for a devenv.sh project.
#[derive(Parser)]
#[command(
    name = "mvm-devenv",
    version,
    about = "A VM for a project with a devenv.nix: its services run from Debian packages in the VM, forwarded to the host (docs/devenv.md)"
)]
struct DevenvCli {
    #[command(subcommand)]
    command: DevenvCmd,
    /// State directory holding the VMs (overrides MVM_STATE_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DevenvCmd {
    /// Create and start a VM for the project (DIR, default: the current
    /// directory) from its devenv.nix, then print its services and the
    /// host's variables.
    #[command(after_help = EXIT_HELP)]
    Init {
        dir: Option<PathBuf>,
        /// The VM's name [default: from the directory's name].
        #[arg(long, value_name = "VM")]
        name: Option<String>,
        /// Seconds to wait for the guest.
        #[arg(long, value_name = "SECS", default_value_t = 900)]
        timeout: u64,
    },
    /// Start the project's VM.
    #[command(after_help = EXIT_HELP)]
    Up {
        dir: Option<PathBuf>,
        #[arg(long, value_name = "SECS", default_value_t = 900)]
        timeout: u64,
    },
    /// Stop the project's VM.
    #[command(after_help = EXIT_HELP)]
    Down { dir: Option<PathBuf> },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Bring a network up (a VM's start does this too), defining it first
    /// if it is new.
    #[command(after_help = EXIT_HELP)]
    Up {
        #[arg(long, value_name = "NAME", default_value = mvm_net::host::network::DEFAULT_NETWORK)]
        name: String,
        /// Bridge name [default: virbr-mvm for "default", else mvm-<name>].
        #[arg(long, value_name = "NAME")]
        bridge: Option<String>,
        /// IPv4 subnet; the host takes its first address [default:
        /// 10.213.0.0/24 for "default"; required for others].
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// A shared segment: its VMs may reach each other (default: isolated).
        #[arg(long)]
        shared: bool,
        #[arg(long)]
        json: bool,
    },
    /// Take a network down: dnsmasq, its nftables table, the bridge.
    /// Refused while VMs run on it; their addresses stay pinned.
    #[command(after_help = EXIT_HELP)]
    Down {
        #[arg(long, value_name = "NAME", default_value = mvm_net::host::network::DEFAULT_NETWORK)]
        name: String,
        /// Print the network's status afterwards as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the networks (or one).
    #[command(after_help = EXIT_HELP)]
    Status {
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Take a network down and forget it (refused while VMs are defined on it).
    #[command(after_help = EXIT_HELP)]
    Rm { name: String },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build a Debian root file system image with mmdebstrap (needs root and
    /// the Debian archive); an image with the same inputs is reused.
    #[command(after_help = EXIT_HELP)]
    Build {
        /// Image name [default: default].
        #[arg(long, value_name = "NAME", default_value = mvm::image::DEFAULT_IMAGE)]
        name: String,
        /// Debian suite or codename.
        #[arg(long, value_name = "SUITE", default_value = mvm::image::DEFAULT_SUITE)]
        suite: String,
        /// Packages on top of minbase, comma-separated [default: the
        /// default image's: bash, build-essential, ca-certificates,
        /// coreutils, curl, git, iproute2, less, nano, procps, sudo, vim-tiny].
        #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
        packages: Option<Vec<String>>,
        /// Debian mirror [default: mmdebstrap's, deb.debian.org].
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
    },
    /// List the images.
    #[command(after_help = EXIT_HELP)]
    List {
        /// Print a JSON array (fields as in docs/images.md).
        #[arg(long)]
        json: bool,
    },
    /// Remove images: a name (all its builds), <name>-<id> or an id.
    #[command(after_help = EXIT_HELP)]
    Rm { image: String },
}

fn main() {
    let invoked = std::env::args_os().next().map(PathBuf::from);
    let manager = |state_dir: &Option<PathBuf>| match state_dir {
        Some(dir) => Manager::new(dir.clone()),
        None => Manager::from_env(),
    };
    match invoked.as_deref().and_then(|p| p.file_name()).and_then(|n| n.to_str()) {
        Some("create-microvm-env") => {
            let cli = CreateEnvCli::parse();
            let m = manager(&cli.state_dir);
            exit_with("create-microvm-env", direnv_init(&m, cli.init))
        }
        Some("mvm-devenv") => {
            let cli = DevenvCli::parse();
            exit_with("mvm-devenv", devenv_cmd(&manager(&cli.state_dir), cli.command))
        }
        _ => {
            let cli = Cli::parse();
            exit_with("mvm", run(&manager(&cli.state_dir), cli.command))
        }
    }
}

/// Ends the process: the program's status, or the error's (reported).
fn exit_with(program: &str, result: mvm::Result<i32>) -> ! {
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            mvm::report(program, &e);
            e.exit_code()
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn run(m: &Manager, cmd: Cmd) -> mvm::Result<i32> {
    match cmd {
        Cmd::Create {
            name,
            project,
            cpus,
            memory,
            persist,
            volume,
            from,
            kernel,
            initrd,
            image,
            no_image,
            ephemeral,
            root_size,
            network,
            no_network,
            forward,
            user,
            env,
            pass_env,
            service,
            vmm_user,
            no_devenv,
        } => {
            let env = env
                .iter()
                .map(|a| parse_assignment(a))
                .collect::<mvm::Result<Vec<_>>>()?;
            for p in &pass_env {
                microvm_dev::config::check_pattern(p)
                    .map_err(|why| Error::Usage(format!("--pass-env {p:?}: {why}")))?;
            }
            let services = service
                .iter()
                .map(|s| mvm::manager::services::parse_service_arg(s))
                .collect::<mvm::Result<Vec<_>>>()?;
            let user = match user {
                Some(u) => u.parse::<UserChoice>()?,
                None => UserChoice::Caller,
            };
            let network = match (network, no_network) {
                (_, true) => NetworkChoice::None,
                (Some(n), false) => NetworkChoice::Named(n),
                (None, false) => NetworkChoice::Default,
            };
            let forwards = forward
                .iter()
                .map(|f| f.parse::<PortSpec>())
                .collect::<mvm::Result<Vec<_>>>()?;
            let volumes = volume
                .iter()
                .map(|v| v.parse::<VolumeSpec>())
                .collect::<mvm::Result<Vec<_>>>()?;
            let root = match (image, no_image) {
                (_, true) => RootChoice::Initramfs,
                (Some(i), false) => RootChoice::Image(i),
                (None, false) => RootChoice::DefaultImage,
            };
            let mut opts = CreateOptions {
                name,
                project,
                cpus,
                memory_mib: memory,
                persist,
                volumes,
                from,
                kernel,
                initrd,
                root,
                ephemeral,
                root_size_mib: root_size,
                network,
                forwards,
                user,
                env,
                pass_env,
                services,
                devenv: None,
                vmm_user,
            };
            let plan = if no_devenv { None } else { opts.apply_devenv()? };
            let mut progress = image_progress(if opts.services.is_empty() {
                "default"
            } else {
                "services"
            });
            let info = m.create_with_progress(&opts, &mut progress)?;
            println!(
                "created VM {} ({}); start it with `mvm start {}`",
                info.name,
                info.state_dir.join(mvm::manager::VM_TOML).display(),
                info.name
            );
            if let Some(plan) = &plan {
                print_devenv_plan(plan);
            }
            for s in &info.services {
                let host = s.host.as_deref().unwrap_or("-");
                let note = match s.host.as_deref().and_then(|h| h.rsplit_once(':')) {
                    Some((_, p)) if p != s.guest_port.to_string() => {
                        format!(" (host port {} was taken)", s.guest_port)
                    }
                    _ => String::new(),
                };
                println!(
                    "service {}: {} on guest port {}, reached from the host at {host}{note}, as user {}",
                    s.name, s.kind, s.guest_port, s.user
                );
            }
            Ok(0)
        }
        Cmd::Image(cmd) => image(m, cmd),
        Cmd::Port {
            name,
            spec,
            rm,
            list,
            json,
        } => port(m, &name, spec, rm, list, json),
        Cmd::Network(cmd) => network(m, cmd),
        Cmd::Start { name, timeout } => start(m, &name, timeout, false),
        Cmd::Restart { name, timeout } => start(m, &name, timeout, true),
        Cmd::Stop { name, timeout } => {
            let how = m.stop(&name, Duration::from_secs(timeout))?;
            println!("{name} {}", how.describe());
            Ok(0)
        }
        Cmd::Rm { name, force } => {
            m.rm(&name, force)?;
            Ok(0)
        }
        Cmd::List { json } => {
            let vms = m.list()?;
            if json {
                println!("{}", to_json(&vms)?);
            } else {
                print_table(&vms);
            }
            Ok(0)
        }
        Cmd::Status { name, json } => {
            let info = m.status(&name)?;
            if json {
                println!("{}", to_json(&info)?);
            } else {
                print_status(&info);
            }
            Ok(0)
        }
        Cmd::Logs { name, follow } => logs(m, &name, follow),
        Cmd::Shell { name, root, session } => {
            let stdin_tty = term::isatty(libc::STDIN_FILENO);
            let settings = session_settings(m, &name, &session)?;
            exec(m, &name, Vec::new(), settings, root, true, true, stdin_tty)
        }
        Cmd::Exec {
            name,
            interactive,
            tty,
            root,
            session,
            command,
        } => {
            let stdin_tty = term::isatty(libc::STDIN_FILENO);
            let forward = interactive || !stdin_tty;
            let argv = command.iter().map(|a| a.as_bytes().to_vec()).collect();
            let settings = session_settings(m, &name, &session)?;
            exec(
                m,
                &name,
                argv,
                settings,
                root,
                tty,
                forward,
                tty && forward && stdin_tty,
            )
        }
        Cmd::Env { name, json } => {
            let vars = m.env_exports(&name)?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> =
                    vars.into_iter().map(|(k, v)| (k, v.into())).collect();
                println!("{}", to_json(&map)?);
            } else {
                print!("{}", export_lines(&vars));
            }
            Ok(0)
        }
        Cmd::Direnv(cmd) => direnv(m, cmd),
        Cmd::Diff { name, stat, paths } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            m.diff(&name, &paths, stat, &mut out)?;
            std::io::Write::flush(&mut out).map_err(mvm::Error::io("writing the diff"))?;
            Ok(0)
        }
        Cmd::Apply { name, check, paths } => {
            let report = m.apply(&name, &paths, check)?;
            for c in &report.changes.changes {
                println!("{}", describe_change(c));
            }
            match &report.applied {
                None if report.changes.is_empty() => println!("no changes to apply"),
                None => println!("{} change(s) would apply cleanly", report.changes.changes.len()),
                Some(_) if report.changes.is_empty() => println!("no changes to apply"),
                Some(done) => {
                    for d in &done.kept_dirs {
                        println!("kept directory {} (not empty on the host)", d.display());
                    }
                    println!("applied {} change(s) to the project", report.changes.changes.len());
                }
            }
            Ok(0)
        }
        Cmd::Reset { name, paths } => {
            let removed = m.reset(&name, &paths)?;
            if removed.is_empty() {
                println!("nothing to reset");
            }
            for p in removed {
                println!("reset {}", p.display());
            }
            Ok(0)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "mvm", &mut std::io::stdout());
            Ok(0)
        }
    }
}

/// `NAME=VALUE` of `create --env`.
fn parse_assignment(arg: &str) -> mvm::Result<(String, String)> {
    match arg.split_once('=') {
        Some((name, value)) if microvm_dev::config::is_env_name(name) => Ok((name.into(), value.into())),
        _ => Err(Error::Usage(format!(
            "--env {arg:?}: expected NAME=VALUE, where NAME is a letter or '_', then letters, digits and '_'"
        ))),
    }
}

fn session_settings(m: &Manager, name: &str, args: &SessionArgs) -> mvm::Result<SessionSettings> {
    let env = args
        .env
        .iter()
        .map(|a| EnvArg::parse(a))
        .collect::<mvm::Result<Vec<_>>>()?;
    m.session_settings(name, &env, args.workdir.as_deref())
}

fn devenv_cmd(m: &Manager, cmd: DevenvCmd) -> mvm::Result<i32> {
    let here = |dir: Option<PathBuf>| dir.unwrap_or_else(|| PathBuf::from("."));
    let project_vm = |dir: &std::path::Path| -> mvm::Result<String> {
        match m.vms_for_project(dir)?.into_iter().next() {
            Some(vm) => Ok(vm.name),
            None => Err(Error::Usage(format!(
                "no VM has {} as its project: run `mvm-devenv init` there first",
                dir.display()
            ))),
        }
    };
    match cmd {
        DevenvCmd::Init { dir, name, timeout } => {
            let dir = here(dir);
            if mvm::devenv::detect(&dir).is_none() {
                return Err(Error::Usage(format!(
                    "{} has no devenv.nix: `mvm create NAME --project DIR` makes a VM for any project",
                    dir.display()
                )));
            }
            if let Some(vm) = m.vms_for_project(&dir)?.into_iter().next() {
                return Err(Error::Usage(format!(
                    "the project already has VM {:?}: `mvm-devenv up` starts it (or `mvm rm {}` first)",
                    vm.name, vm.name
                )));
            }
            let name = match name {
                Some(n) => n,
                None => m.name_for_project(&dir)?,
            };
            let mut opts = CreateOptions {
                name: name.clone(),
                project: Some(dir),
                ..Default::default()
            };
            let plan = opts.apply_devenv()?;
            let mut progress = image_progress(if opts.services.is_empty() {
                "default"
            } else {
                "services"
            });
            m.create_with_progress(&opts, &mut progress)?;
            println!("created VM {name}");
            if let Some(plan) = &plan {
                print_devenv_plan(plan);
            }
            start(m, &name, timeout, false)?;
            let info = m.status(&name)?;
            for s in &info.services {
                println!("service:   {s}");
            }
            println!("host variables (eval \"$(mvm env {name})\"):");
            for (k, v) in m.host_env(&name)? {
                println!("  {k}={v}");
            }
            Ok(0)
        }
        DevenvCmd::Up { dir, timeout } => start(m, &project_vm(&here(dir))?, timeout, false),
        DevenvCmd::Down { dir } => {
            let name = project_vm(&here(dir))?;
            let how = m.stop(&name, DEFAULT_STOP_TIMEOUT)?;
            println!("{name} {}", how.describe());
            Ok(0)
        }
    }
}

fn direnv_init(m: &Manager, init: DirenvInit) -> mvm::Result<i32> {
    let DirenvInit { dir, name, run, force } = init;
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    let report = direnv::write_envrc(&dir, name.as_deref(), &run, force)?;
    if report.envrc_written {
        eprintln!("wrote {}", report.envrc.display());
    } else {
        eprintln!("{} is up to date", report.envrc.display());
    }
    let mvm = direnv::mvm_program();
    match direnv::install_library(&mvm) {
        Ok(lib) => eprintln!("installed the direnv library (use_mvm, mvm_run) as {}", lib.display()),
        Err(e) => {
            eprintln!("mvm: cannot install the direnv library: {e}");
            eprintln!(
                "mvm: install it yourself: mvm direnv lib > ~/.config/direnv/lib/{}",
                direnv::LIB_FILE
            );
        }
    }
    let vm = match &name {
        Some(n) => m.status(n).ok(),
        None => m.vms_for_project(&dir)?.into_iter().next(),
    };
    match vm {
        Some(vm) => eprintln!("the project's VM: {} ({})", vm.name, vm.state.as_str()),
        None => eprintln!(
            "no VM for it yet: `use mvm` creates {} (like `mvm create NAME --project DIR`) and starts it",
            name.map_or_else(|| m.name_for_project(&dir), Ok)?
        ),
    }
    eprintln!(
        "next: direnv allow {}",
        report.envrc.parent().map_or(String::new(), |d| d.display().to_string())
    );
    Ok(0)
}

fn direnv(m: &Manager, cmd: DirenvCmd) -> mvm::Result<i32> {
    match cmd {
        DirenvCmd::Init(init) => direnv_init(m, init),
        DirenvCmd::Lib => {
            print!("{}", direnv::library(&direnv::mvm_program()));
            Ok(0)
        }
        DirenvCmd::Hook { layout_dir, name, dir } => {
            let hook = m.direnv_hook(&dir, name.as_deref(), &layout_dir, &direnv::mvm_program())?;
            print!("{}", hook.script());
            Ok(0)
        }
        DirenvCmd::Shim {
            dir,
            project,
            vm,
            commands,
        } => {
            direnv::write_shims(
                &direnv::mvm_program(),
                m.root(),
                &vm,
                project.as_deref(),
                &dir,
                &commands,
            )?;
            Ok(0)
        }
        DirenvCmd::Up { name, project } => {
            match m.direnv_up(&name, project.as_deref())? {
                StartOutcome::Started { ready_after, .. } => {
                    eprintln!(
                        "{name} is running (agent ready after {:.1} s)",
                        ready_after.as_secs_f64()
                    )
                }
                StartOutcome::AlreadyRunning { pid } => eprintln!("{name} is already running (pid {pid})"),
            }
            Ok(0)
        }
    }
}

fn port(m: &Manager, name: &str, spec: Option<String>, rm: Option<String>, list: bool, json: bool) -> mvm::Result<i32> {
    if let Some(spec) = spec {
        let added = m.add_forward(name, spec.parse()?)?;
        let ip = m.status(name)?.ip;
        println!(
            "{name}: forwarding {added}{}",
            ip.map_or(String::new(), |ip| format!(" (to {ip}:{})", added.guest_port))
        );
    } else if let Some(port) = rm {
        let (port, protocol) = parse_host_port(&port)?;
        for gone in m.remove_forward(name, port, protocol)? {
            println!("{name}: removed {gone}");
        }
    } else if list {
        let forwards = m.forwards(name)?;
        if json {
            println!("{}", to_json(&forwards)?);
        } else {
            println!("HOST                     GUEST  PROTO  FROM");
            for f in forwards {
                let host = format!("{}:{}", f.host_address, f.host_port);
                println!("{host:<24} {:<6} {:<6} {}", f.guest_port, f.protocol, f.origin);
            }
        }
    }
    Ok(0)
}

fn network(m: &Manager, cmd: NetworkCmd) -> mvm::Result<i32> {
    use mvm_net::host::network::NetworkSpec;
    match cmd {
        NetworkCmd::Up {
            name,
            bridge,
            subnet,
            shared,
            json,
        } => {
            let parse_subnet = |s: String| s.parse().map_err(|e| Error::Usage(format!("--subnet: {e}")));
            // Flags change what they name; a defined network refuses a
            // change (Manager::network_up says how to make it anew).
            let spec = match m.network(&name) {
                Ok(n) => {
                    let mut spec = n.spec()?;
                    if let Some(b) = bridge {
                        spec.bridge = b;
                    }
                    if let Some(s) = subnet {
                        spec.subnet = parse_subnet(s)?;
                    }
                    if shared {
                        spec.isolate = false;
                    }
                    spec
                }
                Err(_) => NetworkSpec {
                    bridge: bridge.unwrap_or_else(|| format!("mvm-{name}")),
                    subnet: parse_subnet(subnet.ok_or_else(|| {
                        Error::Usage(format!(
                            "network {name:?} is new: give its --subnet, e.g. 10.214.0.0/24"
                        ))
                    })?)?,
                    isolate: !shared,
                    name,
                },
            };
            let status = m.network_up(&spec)?;
            if json {
                println!("{}", to_json(&status)?);
            } else {
                print_network(&status);
            }
        }
        NetworkCmd::Down { name, json } => {
            let network = m.network(&name)?;
            network.down()?;
            if json {
                println!("{}", to_json(&network.status()?)?);
            } else {
                println!("network {name} is down");
            }
        }
        NetworkCmd::Status { name, json } => {
            let names = match name {
                Some(n) => vec![n],
                None => m.networks(),
            };
            let mut all = Vec::new();
            for n in names {
                all.push(m.network(&n)?.status()?);
            }
            if json {
                println!("{}", to_json(&all)?);
            } else {
                for (i, s) in all.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print_network(s);
                }
            }
        }
        NetworkCmd::Rm { name } => {
            m.network_rm(&name)?;
            println!("network {name} removed");
        }
    }
    Ok(0)
}

fn print_network(s: &mvm_net::host::network::NetworkStatus) {
    println!("network:   {} ({})", s.name, if s.up { "up" } else { "down" });
    println!(
        "bridge:    {} {}/{}",
        s.bridge,
        s.gateway,
        s.subnet.split('/').nth(1).unwrap_or("?")
    );
    println!(
        "subnet:    {}{}",
        s.subnet,
        if s.isolate {
            " (VMs isolated)"
        } else {
            " (shared segment)"
        }
    );
    println!(
        "dnsmasq:   {}",
        s.dnsmasq_pid.map_or("not running".into(), |p| format!("pid {p}"))
    );
    println!("nftables:  {}", if s.nft_table { "table present" } else { "no table" });
    println!(
        "ports:     {}",
        if s.ports.is_empty() {
            "-".into()
        } else {
            s.ports.join(", ")
        }
    );
    for p in &s.pins {
        println!("pin:       {} {} {}", p.ip, p.mac, p.vm);
    }
    println!("state:     {}", s.state_dir.display());
}

fn image(m: &Manager, cmd: ImageCmd) -> mvm::Result<i32> {
    match cmd {
        ImageCmd::Build {
            name,
            suite,
            packages,
            mirror,
        } => {
            let spec = ImageSpec {
                name,
                suite,
                packages: packages.unwrap_or_else(|| ImageSpec::default().packages),
                mirror,
            };
            let mut progress = image_progress(&spec.name);
            let (info, built) = m.images().build(&spec, &mut progress)?;
            if built {
                eprintln!(
                    "built image {} in {:.0} s: {} ({} MiB, {} MiB on disk)",
                    info.reference(),
                    info.build_secs,
                    info.path.display(),
                    info.size_bytes >> 20,
                    info.disk_bytes >> 20
                );
            } else {
                eprintln!("image {} is up to date: {}", info.reference(), info.path.display());
            }
            println!("{}", info.reference());
            Ok(0)
        }
        ImageCmd::List { json } => {
            let images = m.images().list()?;
            let roots = m.image_roots()?;
            let used_by = |i: &ImageInfo| -> Vec<String> {
                roots
                    .iter()
                    .filter(|(_, p)| *p == i.path)
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            if json {
                let rows: Vec<serde_json::Value> = images
                    .iter()
                    .map(|i| {
                        let mut v = serde_json::to_value(i).unwrap_or_default();
                        if let Some(o) = v.as_object_mut() {
                            o.insert("path".into(), i.path.to_string_lossy().into());
                            o.insert("used_by".into(), used_by(i).into());
                        }
                        v
                    })
                    .collect();
                println!("{}", to_json(&rows)?);
            } else {
                println!(
                    "{:<24} {:<13} {:<10} {:>8} {:>8}  {:<11} USED BY",
                    "NAME", "ID", "SUITE", "SIZE", "ON DISK", "CREATED"
                );
                for i in &images {
                    let users = used_by(i);
                    println!(
                        "{:<24} {:<13} {:<10} {:>7}M {:>7}M  {:<11} {}",
                        i.name,
                        i.id,
                        i.suite,
                        i.size_bytes >> 20,
                        i.disk_bytes >> 20,
                        age(i.created),
                        if users.is_empty() {
                            "-".to_string()
                        } else {
                            users.join(",")
                        }
                    );
                }
            }
            Ok(0)
        }
        ImageCmd::Rm { image } => {
            for i in m.remove_image(&image)? {
                println!("removed image {}", i.reference());
            }
            Ok(0)
        }
    }
}

/// How long ago a Unix time was, briefly.
fn age(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} ago", uptime(now.saturating_sub(unix)))
}

/// Image build progress: each step on its own line; on a terminal, also
/// mmdebstrap's lines, each replacing the last.
fn image_progress(name: &str) -> impl FnMut(Progress<'_>) + '_ {
    let on_tty = term::isatty(libc::STDERR_FILENO);
    let started = std::time::Instant::now();
    move |p| match p {
        Progress::Step(step) => {
            if on_tty {
                eprint!("\r\x1b[2K");
            }
            eprintln!("image {name}: {step} ({:.0} s)", started.elapsed().as_secs_f64());
        }
        Progress::Detail(line) if on_tty => {
            let line: String = line.chars().filter(|c| !c.is_control()).take(100).collect();
            eprint!("\r\x1b[2K  {line}");
        }
        Progress::Detail(_) => {}
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> mvm::Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::Usage(format!("cannot write JSON: {e}")))
}

fn start(m: &Manager, name: &str, timeout: u64, restart: bool) -> mvm::Result<i32> {
    let on_tty = term::isatty(libc::STDERR_FILENO);
    let mut last_shown = u64::MAX;
    let mut progress = |elapsed: Duration| {
        let secs = elapsed.as_secs();
        if secs != last_shown {
            last_shown = secs;
            eprint!("\r\x1b[2Kstarting {name}: booting… {secs}s");
        }
    };
    let mut opts = StartOptions {
        timeout: Duration::from_secs(timeout),
        progress: if on_tty { Some(&mut progress) } else { None },
    };
    let result = if restart {
        m.restart(name, DEFAULT_STOP_TIMEOUT, &mut opts)
    } else {
        m.start(name, &mut opts)
    };
    if on_tty {
        eprint!("\r\x1b[2K");
    }
    match result? {
        StartOutcome::Started { ready_after, .. } => {
            if on_tty {
                eprintln!(
                    "{name} is running (agent ready after {:.1} s)",
                    ready_after.as_secs_f64()
                );
            }
        }
        StartOutcome::AlreadyRunning { pid } => eprintln!("{name} is already running (pid {pid})"),
    }
    Ok(0)
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn print_table(vms: &[VmInfo]) {
    let rows: Vec<[String; 8]> = vms
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.state.as_str().to_string(),
                v.pid.map_or("-".into(), |p| p.to_string()),
                v.vcpus.to_string(),
                format!("{}M", v.memory_mib),
                v.ip.clone().unwrap_or_else(|| "-".into()),
                v.uptime_s.map_or("-".into(), uptime),
                v.project.as_ref().map_or("-".into(), |p| p.display().to_string()),
            ]
        })
        .collect();
    let header = ["NAME", "STATE", "PID", "CPUS", "MEMORY", "IP", "UPTIME", "PROJECT"];
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// What `create` took from a devenv.nix and what it left out.
fn print_devenv_plan(plan: &mvm::manager::DevenvPlan) {
    println!(
        "devenv: read {}: {} service(s), {} variable(s)",
        plan.file.display(),
        plan.services.len(),
        plan.env.len()
    );
    for note in &plan.notes {
        println!("devenv: {note}");
    }
}

fn print_status(v: &VmInfo) {
    println!("name:      {}", v.name);
    println!("state:     {}", v.state.as_str());
    if let Some(pid) = v.pid {
        println!("pid:       {pid}");
    }
    if let Some(u) = v.uptime_s {
        println!("uptime:    {}", uptime(u));
    }
    println!("cpus:      {}", v.vcpus);
    println!("memory:    {} MiB", v.memory_mib);
    println!(
        "project:   {}",
        v.project.as_ref().map_or("-".into(), |p| p.display().to_string())
    );
    println!(
        "user:      {}",
        v.user.as_ref().map_or("root (no user)".into(), |u| format!(
            "{} (uid {}, gid {})",
            u.name, u.uid, u.gid
        ))
    );
    println!("mac:       {}", v.mac);
    if let Some(n) = &v.network {
        println!(
            "network:   {n}, address {}",
            v.ip.as_deref().unwrap_or("(pinned at the first start)")
        );
    }
    for f in &v.forwards {
        println!("forward:   {f} ({})", f.origin);
    }
    if let Some(d) = &v.devenv {
        println!("devenv:    {}", d.display());
    }
    for s in &v.services {
        println!("service:   {s}");
    }
    println!("state dir: {}", v.state_dir.display());
    if let Some(e) = &v.last_exit {
        println!("last exit: {e}");
    }
    if let Some(e) = &v.error {
        println!("error:     {e}");
    }
    if v.state == VmState::Crashed && !v.console_tail.is_empty() {
        println!("last console lines:");
        for l in &v.console_tail {
            println!("  {l}");
        }
    }
}

fn logs(m: &Manager, name: &str, follow: bool) -> mvm::Result<i32> {
    let info = m.status(name)?;
    let path = info.state_dir.join(CONSOLE_LOG);
    let mut out = std::io::stdout();
    let mut pos = 0u64;
    loop {
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                let len = f.metadata().map_or(0, |m| m.len());
                // A new start truncates the console log: begin again.
                if len < pos {
                    pos = 0;
                }
                if len > pos {
                    f.seek(SeekFrom::Start(pos))
                        .and_then(|_| std::io::copy(&mut (&mut f).take(len - pos), &mut out))
                        .map_err(Error::io(format!("reading {}", path.display())))?;
                    out.flush().map_err(Error::io("writing the console output"))?;
                    pos = len;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !follow {
                    eprintln!("mvm: {name} has no console output yet (it never started)");
                }
            }
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()))(e)),
        }
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Run `argv` (empty: a login shell) in the guest, as the VM's user
/// unless `as_root`; the program's status.
#[allow(clippy::too_many_arguments)]
fn exec(
    m: &Manager,
    name: &str,
    argv: Vec<Vec<u8>>,
    settings: SessionSettings,
    as_root: bool,
    tty: bool,
    forward_stdin: bool,
    raw: bool,
) -> mvm::Result<i32> {
    let info = m.status(name)?;
    if info.state != VmState::Running {
        return Err(Error::NotRunning { name: name.into() });
    }
    let (rows, cols) = term::window_size().unwrap_or((24, 80));
    let request = ExecRequest {
        argv,
        env: settings.env,
        cwd: settings.cwd,
        tty: tty.then(|| Tty {
            rows,
            cols,
            term: std::env::var("TERM")
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "xterm".into()),
        }),
        user: if as_root { None } else { info.user.map(|u| u.name) },
    };
    // Signals are blocked before any thread starts, so only the signal
    // thread sees them.
    let control = std::sync::Arc::new(std::sync::Mutex::new(None::<mvm::ExecControl>));
    let seen = control.clone();
    let forwarded = term::forward_signals(
        &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH],
        || {},
        move |sig| {
            let Ok(c) = seen.lock() else { return };
            let Some(c) = c.as_ref() else {
                // Still connecting: nothing runs in the guest yet.
                if sig != libc::SIGWINCH {
                    std::process::exit(128 + sig);
                }
                return;
            };
            if sig == libc::SIGWINCH {
                if tty {
                    if let Some((r, c2)) = term::window_size() {
                        let _ = c.resize(r, c2);
                    }
                }
            } else {
                let _ = c.signal(sig);
            }
        },
    );
    if let Err(e) = forwarded {
        eprintln!("mvm: warning: cannot forward signals to the guest program ({e}): Ctrl-C ends mvm itself");
    }
    let session = m.agent(name)?.exec(request)?;
    if let Ok(mut c) = control.lock() {
        *c = Some(session.control());
    }
    let raw_mode = if raw {
        microvm_dev::console::RawTerminal::enter(libc::STDIN_FILENO)
            .ok()
            .flatten()
    } else {
        None
    };
    let result = session.run(
        forward_stdin.then(std::io::stdin),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    drop(raw_mode);
    Ok(result?.status.shell_code())
}

/// One line per change, as `git status --short` would mark it.
fn describe_change(c: &mvm::manager::changes::Change) -> String {
    use mvm::manager::changes::ChangeKind;
    match &c.kind {
        ChangeKind::Added => format!("A  {}", c.path.display()),
        ChangeKind::Deleted => format!("D  {}", c.path.display()),
        ChangeKind::Modified => format!("M  {}", c.path.display()),
        ChangeKind::TypeChanged => format!("T  {}", c.path.display()),
        ChangeKind::Renamed { from } => format!("R  {} -> {}", from.display(), c.path.display()),
    }
}
