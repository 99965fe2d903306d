//! `ws1-probe rules`: the Prometheus rule groups (recording rules, the WS1 plan's threshold
//! alerts, burn-rate alerts per SLO, the agent's own alerts) for a configuration.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use ws1_probe::{
    slo::rules,
    targeting::config::{self, FlagOverrides},
};

/// Print Prometheus alerting and recording rules for the configured services and SLOs
#[derive(clap::Args, Debug)]
pub struct RulesArgs {
    /// TOML config file with [[service]] SLOs and [alerts] thresholds (also: WS1_PROBE_CONFIG);
    /// without one only the threshold and agent rules are printed
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Write the rules to FILE instead of stdout
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: RulesArgs) -> anyhow::Result<()> {
    let flags = FlagOverrides {
        config: args.config.clone(),
        ..Default::default()
    };
    let settings = config::resolve(&flags, Vec::new(), |k| std::env::var(k).ok())
        .context("invalid configuration")?;
    let source = settings.config_path.as_ref().map_or_else(
        || "the built-in defaults".to_owned(),
        |p| p.display().to_string(),
    );
    let file = rules::generate(&settings.slos, &settings.alerts);
    let yaml = rules::to_yaml(&file, &source).context("cannot encode the rules as YAML")?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, &yaml)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let (alerts, records) =
                file.groups
                    .iter()
                    .flat_map(|g| &g.rules)
                    .fold((0, 0), |(a, r), rule| {
                        if rule.alert.is_some() {
                            (a + 1, r)
                        } else {
                            (a, r + 1)
                        }
                    });
            eprintln!(
                "wrote {}: {alerts} alerts and {records} recording rules for {} SLO(s); check with `promtool check rules {}`",
                path.display(),
                settings.slos.len(),
                path.display()
            );
        }
        None => std::io::stdout()
            .write_all(yaml.as_bytes())
            .context("cannot write to stdout")?,
    }
    Ok(())
}
