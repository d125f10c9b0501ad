//! `[[trigger.cron]]`: runs each schedule's component at its times (real time; the guests
//! see the virtual clock).

use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::Utc;

use super::runtime::Runtime;

/// One parsed schedule.
pub struct CronJob {
    /// The component to run.
    pub component: String,
    schedule: cron::Schedule,
}

impl CronJob {
    /// Parses a six-field expression (seconds first).
    pub fn new(component: &str, expression: &str) -> Result<Self> {
        let schedule =
            cron::Schedule::from_str(expression).with_context(|| format!("cron expression '{expression}'"))?;
        Ok(Self { component: component.to_owned(), schedule })
    }

    /// When it fires next after now.
    pub fn next(&self) -> Option<chrono::DateTime<Utc>> {
        self.schedule.upcoming(Utc).next()
    }
}

/// Fires one job forever.
pub async fn run(job: CronJob, runtime: Arc<Runtime>) {
    while let Some(next) = job.next() {
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        if let Err(error) = runtime.run_cron(&job.component).await {
            runtime.log.push_host(&format!("cron {}: {error:#}", job.component));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_every_minute_schedule_fires_on_the_minute() {
        let job = CronJob::new("expire-fn", "0 * * * * *").unwrap();
        let next = job.next().unwrap();
        assert_eq!(next.timestamp() % 60, 0);
        assert!(next > Utc::now() && next <= Utc::now() + chrono::TimeDelta::seconds(60));
        assert!(CronJob::new("x", "not a schedule").is_err());
    }
}
