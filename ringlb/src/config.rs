//! The configuration file (`--config PATH` or `RINGLB_CONFIG`): TOML that sets flags.
//!
//! Layout: top-level keys are the global flags (`log-format`, `log-level`); a table per subcommand
//! (`[run]`, `[check]`, `[demo]`) holds that subcommand's flags. A key is the flag's long name
//! without `--`; a switch takes `true` or `false`, a repeatable flag an array (or one value), any
//! other flag one string or number, spelled as on the command line (`"30s"`, `"127.0.0.1:9901"`).
//!
//! Invariants:
//! - The file is only another source of command-line arguments: each key becomes `--key=value`,
//!   checked here by that flag's own value parser (so a bad value is an error naming the file and
//!   the key), and clap then parses the file's arguments and the real ones as one command line, so
//!   requirements and conflicts between flags hold across both.
//! - Precedence is command line, then environment variable (`NODE_NAME`, `POD_NAME`, ...), then
//!   file, then default: a flag the command line or its variable sets is left out of the file's
//!   arguments. Leaving it out, rather than relying on clap's `args_override_self`, is what makes a
//!   repeatable flag on the command line replace the file's list (clap appends every occurrence of
//!   an `Append` flag, override or not) and keeps clap's error for a single-valued flag that the
//!   real command line repeats.
//! - Nothing in the file is ignored: an unknown key, a table where a value belongs or a value of
//!   the wrong type is an error, never a silent default.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// The flag that names the file; the file cannot set it.
const CONFIG_FLAG: &str = "config";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", file.display())]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{}: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{}: unknown key `{key}`{hint}", file.display())]
    UnknownKey { file: PathBuf, key: String, hint: String },
    #[error("{}: `{key}`: {problem}", file.display())]
    InvalidValue { file: PathBuf, key: String, problem: String },
}

/// What to parse: the real arguments with the file's (if any) in place.
#[derive(Debug)]
pub struct Arguments {
    pub all: Vec<OsString>,
    /// The file and the arguments taken from it, for error messages.
    pub from_file: Option<(PathBuf, Vec<OsString>)>,
}

/// `argv` with the flags of the configuration file it names (if any) inserted, each before the
/// real arguments of its level (globals first, a subcommand's right after its name).
pub fn arguments(command: &Command, argv: Vec<OsString>) -> Result<Arguments, ConfigError> {
    let unchanged = |argv| Ok(Arguments { all: argv, from_file: None });
    // A first, forgiving parse says which file, which subcommand and which flags the real command
    // line and environment set. `--help` and friends end it with an "error": nothing to add then.
    let Ok(given) = command.clone().ignore_errors(true).try_get_matches_from(&argv) else {
        return unchanged(argv);
    };
    let subcommand = given.subcommand();
    let file = subcommand
        .and_then(|(_, matches)| matches.get_one::<PathBuf>(CONFIG_FLAG))
        .or_else(|| given.get_one::<PathBuf>(CONFIG_FLAG));
    let Some(file) = file.cloned() else { return unchanged(argv) };
    let text =
        std::fs::read_to_string(&file).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
    let table: toml::Table = text.parse().map_err(|error: toml::de::Error| ConfigError::Syntax {
        file: file.clone(),
        message: error.to_string().trim_end().to_owned(),
    })?;
    let file_arguments = FileArguments::from_table(command, &file, &table)?;

    let set = |id: &str| is_set(&given, id) || subcommand.is_some_and(|(_, matches)| is_set(matches, id));
    let globals: Vec<OsString> = file_arguments
        .globals
        .into_iter()
        .filter(|(id, _)| !set(id))
        .flat_map(|(_, arguments)| arguments)
        .collect();
    let (position, local) = match subcommand {
        Some((name, _)) => {
            let Some(position) = subcommand_position(command, &argv, name) else {
                return unchanged(argv); // the forgiving parse saw what the strict one rejects
            };
            let local: Vec<OsString> = file_arguments
                .subcommands
                .into_iter()
                .filter(|(sub, id, _)| sub == name && !set(id))
                .flat_map(|(_, _, arguments)| arguments)
                .collect();
            (position, local)
        }
        None => (0, Vec::new()),
    };
    let mut all = Vec::with_capacity(argv.len() + globals.len() + local.len());
    all.extend(argv.iter().take(1).cloned());
    all.extend(globals.iter().cloned());
    all.extend(argv.iter().take(position + 1).skip(1).cloned());
    all.extend(local.iter().cloned());
    all.extend(argv.iter().skip(position + 1).cloned());
    Ok(Arguments { all, from_file: Some((file, [globals, local].concat())) })
}

/// Whether the command line or an environment variable gave flag `id`.
fn is_set(matches: &ArgMatches, id: &str) -> bool {
    // try_get_raw first: value_source panics (in debug builds) on an id of another level.
    matches.try_get_raw(id).is_ok_and(|raw| raw.is_some())
        && matches.value_source(id).is_some_and(|source| source != ValueSource::DefaultValue)
}

/// Where subcommand `name` is in `argv`: the first word that is neither a top-level flag nor
/// the value of one.
fn subcommand_position(command: &Command, argv: &[OsString], name: &str) -> Option<usize> {
    let mut index = 1;
    while let Some(word) = argv.get(index) {
        let text = word.to_str()?;
        if let Some(long) = text.strip_prefix("--") {
            let takes_value = !long.contains('=')
                && command
                    .get_arguments()
                    .any(|arg| arg.get_long() == Some(long) && arg.get_action().takes_values());
            index += if takes_value { 2 } else { 1 };
        } else if text.starts_with('-') {
            index += 1; // -h, -V: the top level has no short flag with a value
        } else {
            return (text == name).then_some(index);
        }
    }
    None
}

/// The file's flags as arguments, keyed by clap id, global ones apart from each subcommand's.
struct FileArguments {
    globals: Vec<(String, Vec<OsString>)>,
    /// (subcommand, id, arguments)
    subcommands: Vec<(String, String, Vec<OsString>)>,
}

impl FileArguments {
    fn from_table(command: &Command, file: &Path, table: &toml::Table) -> Result<FileArguments, ConfigError> {
        let mut globals = Vec::new();
        let mut subcommands = Vec::new();
        for (key, value) in table {
            if let Some(sub) = command.find_subcommand(key) {
                let toml::Value::Table(flags) = value else {
                    let problem = format!("expected a table of `ringlb {key}` flags ([{key}])");
                    return Err(invalid(file, key, problem));
                };
                for (flag, value) in flags {
                    let path = format!("{key}.{flag}");
                    let arg =
                        setting(sub, flag).ok_or_else(|| unknown(file, &path, unknown_hint(sub, flag)))?;
                    let arguments =
                        flag_arguments(arg, value).map_err(|problem| invalid(file, &path, problem))?;
                    subcommands.push((key.clone(), arg.get_id().to_string(), arguments));
                }
            } else if let Some(arg) = setting(command, key).filter(|arg| arg.is_global_set()) {
                let arguments = flag_arguments(arg, value).map_err(|problem| invalid(file, key, problem))?;
                globals.push((arg.get_id().to_string(), arguments));
            } else {
                let hint = match command.get_subcommands().find(|sub| setting(sub, key).is_some()) {
                    Some(sub) => {
                        format!(" (--{key} is a flag of `ringlb {0}`: put it under [{0}])", sub.get_name())
                    }
                    None => unknown_hint(command, key),
                };
                return Err(unknown(file, key, hint));
            }
        }
        Ok(FileArguments { globals, subcommands })
    }
}

/// The flag `--long` of `command` that a file may set (not `--help`, `--version`, `--config`).
fn setting<'a>(command: &'a Command, long: &str) -> Option<&'a Arg> {
    command.get_arguments().find(|arg| {
        arg.get_long() == Some(long)
            && arg.get_id() != CONFIG_FLAG
            && !matches!(
                arg.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

fn unknown_hint(command: &Command, key: &str) -> String {
    let name = if command.get_name() == "ringlb" {
        "ringlb".to_owned()
    } else {
        format!("ringlb {}", command.get_name())
    };
    if key == CONFIG_FLAG {
        return " (a configuration file cannot name another)".to_owned();
    }
    format!(" (`{name}` has no --{key}; keys are long flag names, see `{name} --help`)")
}

fn unknown(file: &Path, key: &str, hint: String) -> ConfigError {
    ConfigError::UnknownKey { file: file.to_path_buf(), key: key.to_owned(), hint }
}

fn invalid(file: &Path, key: &str, problem: String) -> ConfigError {
    ConfigError::InvalidValue { file: file.to_path_buf(), key: key.to_owned(), problem }
}

/// `value` as the arguments that set `arg`, each value checked by the flag's own parser.
fn flag_arguments(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().expect("settings are found by their long name");
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) => Ok(vec![format!("--{long}").into()]),
        (ArgAction::SetTrue, toml::Value::Boolean(false)) => Ok(Vec::new()),
        (ArgAction::SetTrue, other) => Err(format!("a switch takes true or false, not {}", describe(other))),
        (ArgAction::Append, toml::Value::Array(values)) => {
            values.iter().map(|value| one_value(arg, long, value)).collect()
        }
        (_, toml::Value::Array(_)) => Err(format!("--{long} takes one value, not an array")),
        (_, value) => Ok(vec![one_value(arg, long, value)?]),
    }
}

/// `--long=value` for one scalar `value`, which the flag's parser accepts.
fn one_value(arg: &Arg, long: &str, value: &toml::Value) -> Result<OsString, String> {
    let text = match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(number) => number.to_string(),
        toml::Value::Float(number) => number.to_string(),
        toml::Value::Boolean(switch) => switch.to_string(),
        other => return Err(format!("expected a string or a number, not {}", describe(other))),
    };
    check_value(arg, &text)?;
    Ok(format!("--{long}={text}").into())
}

/// Runs `text` through the flag's value parser alone, in a command of this one (positional)
/// argument, so that its error is about the value and not about flags it requires or conflicts with.
fn check_value(arg: &Arg, text: &str) -> Result<(), String> {
    let alone =
        Arg::new(arg.get_id().clone()).value_parser(arg.get_value_parser().clone()).allow_hyphen_values(true);
    let probe = Command::new("ringlb").no_binary_name(true).arg(alone);
    probe.try_get_matches_from([text]).map(drop).map_err(|error| {
        let message = error.to_string();
        let first_line = message.lines().next().unwrap_or_default();
        let long = arg.get_long().unwrap_or_default();
        // A positional argument is named `<id>` when required, `[id]` when not.
        let id = arg.get_id();
        let first_line = first_line
            .replace(&format!("'[{id}]'"), &format!("--{long}"))
            .replace(&format!("'<{id}>'"), &format!("--{long}"));
        first_line.strip_prefix("error: ").unwrap_or(&first_line).to_owned()
    })
}

fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("the string {text:?}"),
        toml::Value::Table(_) => "a table".to_owned(),
        toml::Value::Array(_) => "an array".to_owned(),
        other => format!("{} {other}", other.type_str()),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::cli::{AdminAddr, Cli, Command as Sub};

    fn parse(file: &str, args: &[&str]) -> Result<Cli, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, file).expect("write config");
        let mut argv: Vec<OsString> = vec!["ringlb".into(), "--config".into(), path.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let arguments = arguments(&Cli::command(), argv).map_err(|error| error.to_string())?;
        Cli::try_parse_from(arguments.all).map_err(|error| error.to_string())
    }

    fn run(cli: Cli) -> crate::cli::RunArgs {
        match cli.command {
            Sub::Run(args) => args,
            other => panic!("not run: {other:?}"),
        }
    }
    #[test]
    fn file_flags_apply_and_the_command_line_wins() {
        let file = "log-level = \"debug\"\n[run]\nmanifests = \"/etc/ringlb/manifests\"\nworkers = 2\n\
                    admin = \"127.0.0.1:9911\"\nshutdown-grace = \"5s\"\n";
        let cli = parse(file, &["run"]).expect("valid");
        assert_eq!(cli.log_level, "debug");
        let args = run(cli);
        assert_eq!(args.manifests.as_deref(), Some(Path::new("/etc/ringlb/manifests")));
        assert_eq!(args.engine.workers, Some(2));
        assert_eq!(args.admin.admin, AdminAddr::Listen("127.0.0.1:9911".parse().expect("address")));
        assert_eq!(args.engine.shutdown_grace, std::time::Duration::from_secs(5));

        // Each flag on the command line, before or after the subcommand, beats the file's.
        let cli = parse(file, &["--log-level", "warn", "run", "--workers", "3"]).expect("valid");
        assert_eq!(cli.log_level, "warn");
        assert_eq!(run(cli).engine.workers, Some(3));
        let cli = parse(file, &["run", "--log-level=error", "--admin", "off"]).expect("valid");
        assert_eq!(cli.log_level, "error");
        assert_eq!(run(cli).admin.admin, AdminAddr::Off);
        assert!(
            parse(file, &["run", "--workers", "3", "--workers", "4"]).is_err(),
            "a real repeat stays an error"
        );
    }

    #[test]
    fn switches_take_booleans_and_repeatable_flags_arrays_that_the_command_line_replaces() {
        let file = "[run]\nmanifests = \"m\"\nno-pin = true\nexternal-ips = false\ndefault-class = false\n\
                    vip-link = \"ringlb0\"\nl2-listen = \"10.0.0.11:7946\"\n\
                    l2-peer = [\"10.0.0.12:7946\", \"10.0.0.13:7946\"]\n";
        let args = run(parse(file, &["run"]).expect("valid"));
        assert!(args.engine.no_pin && !args.cluster.external_ips && !args.cluster.default_class);
        let peers: Vec<String> = args.vips.l2_peers.iter().map(ToString::to_string).collect();
        assert_eq!(peers, ["10.0.0.12:7946", "10.0.0.13:7946"]);

        let args =
            run(parse(file, &["run", "--l2-peer", "10.0.0.14:7946", "--external-ips"]).expect("valid"));
        let peers: Vec<String> = args.vips.l2_peers.iter().map(ToString::to_string).collect();
        assert_eq!(peers, ["10.0.0.14:7946"], "the command line's list replaces the file's");
        assert!(args.cluster.external_ips);
    }

    #[test]
    fn requirements_and_conflicts_hold_across_the_file_and_the_command_line() {
        let file = "[run]\nmanifests = \"m\"\nsource-ports = \"worker\"\n";
        assert!(parse(file, &["run"]).is_err(), "--source-ports worker needs --source-port-range");
        let args = run(parse(file, &["run", "--source-port-range", "40000-40999"]).expect("valid"));
        assert_eq!(args.engine.source_port_range, Some(40000..=40999));
        let conflict = parse(file, &["run", "--kubeconfig", "k"]).expect_err("manifests and a cluster");
        assert!(conflict.contains("--manifests") && conflict.contains("--kubeconfig"), "{conflict}");
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_the_file_and_the_key() {
        let error = parse("[run]\nmanifests = \"m\"\nworker = 2\n", &["run"]).expect_err("typo");
        assert!(error.contains("config.toml: unknown key `run.worker`"), "{error}");
        assert!(error.contains("no --worker"), "{error}");
        let error = parse("workers = 2\n", &["run"]).expect_err("a run flag at the top level");
        assert!(error.contains("unknown key `workers`") && error.contains("put it under [run]"), "{error}");
        let error = parse("[serve]\nworkers = 2\n", &["run"]).expect_err("no such subcommand");
        assert!(error.contains("unknown key `serve`"), "{error}");
        let error = parse("[run]\nconfig = \"other.toml\"\n", &["run"]).expect_err("a file names no file");
        assert!(error.contains("`run.config`"), "{error}");
        let error = parse("[run]\nhelp = true\n", &["run"]).expect_err("not a setting");
        assert!(error.contains("`run.help`"), "{error}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_an_error_naming_the_file_and_the_key() {
        let cases = [
            ("[run]\nworkers = \"many\"\n", "`run.workers`: invalid value 'many' for --workers"),
            ("[run]\nworkers = -1\n", "`run.workers`: invalid value '-1'"),
            ("[run]\nno-pin = 1\n", "`run.no-pin`: a switch takes true or false, not integer 1"),
            ("[run]\nworkers = [1, 2]\n", "`run.workers`: --workers takes one value, not an array"),
            ("[run]\nrelay = \"fast\"\n", "`run.relay`: invalid value 'fast'"),
            (
                "[run]\nl2-peer = [{ address = \"x\" }]\n",
                "`run.l2-peer`: expected a string or a number, not a table",
            ),
            ("[run]\nshutdown-grace = \"soon\"\n", "`run.shutdown-grace`: invalid value 'soon'"),
            ("run = 1\n", "`run`: expected a table of `ringlb run` flags"),
            ("log-format = \"xml\"\n", "`log-format`: invalid value 'xml'"),
        ];
        for (file, expected) in cases {
            let error = parse(file, &["run", "--manifests", "m"]).expect_err(file);
            assert!(error.contains("config.toml: ") && error.contains(expected), "{file:?}: {error}");
        }
        let error = parse("[run\n", &["run"]).expect_err("not TOML");
        assert!(error.contains("config.toml: "), "{error}");
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let argv = ["ringlb", "run", "--config", "/nonexistent/ringlb.toml"].map(OsString::from).to_vec();
        let error = arguments(&Cli::command(), argv).expect_err("no such file").to_string();
        assert!(error.starts_with("/nonexistent/ringlb.toml: "), "{error}");
    }

    #[test]
    fn other_subcommands_take_their_own_table() {
        let file = "[run]\nworkers = 7\n[check]\njson = true\n[demo]\nport = 18080\n";
        let cli = parse(file, &["check", "--manifests", "m"]).expect("valid");
        assert!(matches!(cli.command, Sub::Check(args) if args.json));
        let cli = parse(file, &["demo"]).expect("valid");
        assert!(
            matches!(cli.command, Sub::Demo(args) if args.port == 18080 && args.engine.workers.is_none())
        );
    }

    #[test]
    fn without_a_file_the_arguments_are_unchanged() {
        let argv = ["ringlb", "run", "--manifests", "m"].map(OsString::from).to_vec();
        let arguments = arguments(&Cli::command(), argv.clone()).expect("no file");
        assert_eq!((arguments.all, arguments.from_file.is_none()), (argv, true));
    }

    #[test]
    fn every_example_in_the_packaged_config_is_a_valid_flag() {
        let shipped = include_str!("../../deploy/debian/config.toml");
        parse(shipped, &["run"]).expect("the file as shipped");
        // Uncommented, the examples (`# key = value  # note`) must all be flags with good values.
        let examples = shipped.lines().filter(|line| is_example(line)).count();
        assert!(examples >= 25, "the examples are found: {examples}");
        let uncommented: String = shipped
            .lines()
            .map(|line| if is_example(line) { &line[2..] } else { line })
            .map(|line| format!("{line}\n"))
            .collect();
        let args = run(parse(&uncommented, &["run"]).expect("the file with every example uncommented"));
        assert_eq!((args.engine.workers, args.vips.l2_peers.len()), (Some(4), 2));
    }

    /// A line `# key = value` of the packaged config.
    fn is_example(line: &str) -> bool {
        let key = line.strip_prefix("# ").and_then(|rest| rest.split_once(" = ")).map(|(key, _)| key);
        key.is_some_and(|key| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
    }
}
