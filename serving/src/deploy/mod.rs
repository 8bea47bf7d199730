//! Canary deployments (`POST /v1/models/{name}/deploy`): a new version ramps through traffic
//! steps by itself, judged at every step against the version it would replace, promoted to
//! production at the end or rolled back the moment a guardrail breaks, with every decision and
//! its reason recorded.
//!
//! State lives in the registry (`marquee_registry` deployments: create-only revisions), so a
//! restart resumes a deployment and every server following the registry agrees on it: each server
//! judges the requests it served, and whichever decides first writes the next revision; the others
//! find it taken, read it and follow. Starting a deployment points the registry alias `canary` at
//! the version, so every server loads it within one poll; the traffic itself is a
//! [`traffic::Policy`](crate::traffic::Policy) per step (a user-level split salted with the
//! deployment id, so a user who saw the canary keeps it as the share grows).

pub mod judge;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marquee_events::{EventLog, Record};
use marquee_registry::{Registry, RegistryError, Stage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ServingError;
use crate::models::ModelManager;
use crate::traffic::{
    CONTROL, DEFAULT_SPLIT_ENTITY, Policy, Router, SHADOW, Share, Split, Variant, Window,
};
use judge::{Guardrails, Verdict};

/// The registry alias a deployment points at its canary version, so that servers load it.
pub const CANARY_ALIAS: &str = "canary";

/// The name the canary variant has in traffic policies, metrics and answers.
pub const CANARY: &str = "canary";

/// Steps when a request names none (the design's ramp).
const DEFAULT_STEPS: [f64; 4] = [5.0, 20.0, 50.0, 100.0];

/// Seconds per step when a request gives neither `step_seconds` nor `step_requests`.
const DEFAULT_STEP_SECONDS: f64 = 60.0;

/// How long a deployment waits for its canary version to load on this server before it gives up
/// and rolls back (the registry poll plus download and warm-up).
const LOAD_PATIENCE: Duration = Duration::from_secs(120);

/// What an operator sends to start a deployment. Either the ramp (`steps`, `step_seconds` and/or
/// `step_requests`, `guardrails`, `shadow`), or the platform API's shape (`traffic_percentage`:
/// a canary held at that share until promoted; `replicas` and `instance_type` are recorded for
/// the cluster's deployer, not applied by the server).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub version: u64,
    #[serde(default)]
    pub steps: Option<Vec<f64>>,
    #[serde(default)]
    pub traffic_percentage: Option<f64>,
    #[serde(default)]
    pub step_seconds: Option<f64>,
    #[serde(default)]
    pub step_requests: Option<u64>,
    #[serde(default)]
    pub guardrails: Guardrails,
    /// Mirror traffic to the canary first, judged before any user sees it.
    #[serde(default)]
    pub shadow: bool,
    /// The entity whose id keeps a user on one variant (default `user_id`).
    #[serde(default)]
    pub entity: Option<String>,
    /// Who starts it (recorded; also the production approval when it promotes).
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub replicas: Option<Value>,
    #[serde(default)]
    pub instance_type: Option<Value>,
}

/// How a deployment ramps and is judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The canary's share at each step, increasing.
    pub steps: Vec<Share>,
    pub step_seconds: Option<f64>,
    pub step_requests: Option<u64>,
    pub guardrails: Guardrails,
    /// A shadow phase before the first step.
    pub shadow: bool,
    pub entity: String,
    /// Stay at the last step until promoted by hand (the platform API's `traffic_percentage`).
    pub hold: bool,
}

/// Where a deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for the canary version to load.
    Starting,
    /// Mirrored traffic only.
    Shadow,
    /// At a step of the ramp.
    Progressing,
    /// At its held share, waiting to be promoted by hand.
    Holding,
    /// Stopped at its share by an operator.
    Paused,
    Promoted,
    RolledBack,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Promoted | Status::RolledBack)
    }
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Started,
    Loaded,
    ShadowPassed,
    Advanced,
    Held,
    Paused,
    Resumed,
    Promoted,
    RolledBack,
}

/// One decision, with its reason and the evidence it was taken on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at: String,
    pub by: String,
    pub action: Action,
    /// The canary's share after the decision, in percent.
    pub share: f64,
    pub reason: String,
    /// The windows the decision saw, per variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Value>,
}

/// A deployment's whole state: what the registry keeps, one revision per decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub model: String,
    pub number: u64,
    pub version: u64,
    pub control: u64,
    pub plan: Plan,
    pub status: Status,
    /// The step it is at (an index into `plan.steps`; 0 also during the shadow phase).
    pub step: usize,
    /// When the current step (or phase) began, milliseconds since the epoch.
    pub step_started_ms: i64,
    /// Status before a pause, to resume to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_from: Option<Status>,
    pub created_at: String,
    pub created_by: String,
    /// What the request asked that the server records but does not apply.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub not_applied: BTreeMap<String, Value>,
    pub decisions: Vec<Decision>,
    /// The registry revision this state is (not stored: the record's own number).
    #[serde(skip)]
    pub revision: u64,
}

impl Deployment {
    /// The canary's share now, in percent (0 while starting or in shadow).
    pub fn share(&self) -> Share {
        match self.status {
            Status::Starting | Status::Shadow | Status::RolledBack => Share::default(),
            Status::Promoted => Share::ALL,
            Status::Progressing | Status::Holding | Status::Paused => self.plan.steps[self.step],
        }
    }

    /// The traffic policy this state asks for, `None` when it routes nothing.
    fn policy(&self) -> Option<Policy> {
        let split = Split::User {
            entity: self.plan.entity.clone(),
        };
        let paused_in_shadow =
            self.status == Status::Paused && self.paused_from == Some(Status::Shadow);
        match self.status {
            Status::Starting | Status::RolledBack => None,
            Status::Shadow => Some(Policy {
                control: self.control,
                variants: Vec::new(),
                split,
                salt: self.id.clone(),
                shadow: Some(crate::traffic::Shadow {
                    version: self.version,
                    share: Share::ALL,
                }),
            }),
            _ if paused_in_shadow => None,
            // Promoted: everyone on the new version until this server serves it as production.
            Status::Progressing | Status::Holding | Status::Paused | Status::Promoted => {
                Some(Policy {
                    control: self.control,
                    variants: vec![Variant {
                        name: CANARY.into(),
                        version: self.version,
                        share: self.share(),
                    }],
                    split,
                    salt: self.id.clone(),
                    shadow: None,
                })
            }
        }
    }
}

/// Deployments of every model, driven by this server.
pub struct Deployments {
    models: Arc<ModelManager>,
    router: Arc<Router>,
    /// Deployments not yet final, by model, as this server last read or wrote them.
    active: Mutex<BTreeMap<String, Deployment>>,
    /// The highest deployment number seen per model, so polling lists only newer ones.
    seen: Mutex<BTreeMap<String, u64>>,
    /// Promoted deployments whose version this server does not yet serve as production: their
    /// users stay on it (the policy at 100%) until the registry poll moves production here.
    handing_over: Mutex<BTreeMap<String, Deployment>>,
    /// Where each decision this server writes is announced (`model.deployed`,
    /// `model.rolled_back`).
    events: Option<EventLog>,
}

fn now_ms() -> i64 {
    marquee_feature_store::online::now_ms()
}

fn windows_json(windows: &BTreeMap<String, Window>) -> Value {
    Value::Object(
        windows
            .iter()
            .map(|(variant, w)| {
                (
                    variant.clone(),
                    json!({
                        "requests": w.requests,
                        "server_errors": w.server_errors,
                        "client_errors": w.client_errors,
                        "error_rate": w.error_rate(),
                        "p50_ms": w.quantile_ms(0.5),
                        "p99_ms": w.quantile_ms(0.99),
                    }),
                )
            })
            .collect(),
    )
}

/// A deployment id as `{model}-{number}`, split back.
fn parse_id(id: &str) -> Result<(&str, u64), ServingError> {
    id.rsplit_once('-')
        .and_then(|(model, number)| Some((model, number.parse().ok()?)))
        .filter(|(model, _)| !model.is_empty())
        .ok_or_else(|| {
            ServingError::NotFound(format!(
                "deployment '{id}' is not found (ids look like MODEL-NUMBER, e.g. pricing-3)"
            ))
        })
}

fn registry_error(error: RegistryError) -> ServingError {
    match error {
        RegistryError::Conflict(message) => ServingError::Conflict(message),
        RegistryError::ModelNotFound(_) | RegistryError::VersionNotFound { .. } => {
            ServingError::NotFound(error.to_string())
        }
        RegistryError::Refused(message) | RegistryError::Invalid(message) => {
            ServingError::InvalidInput(message)
        }
        other => ServingError::Unavailable(format!("the registry: {other}")),
    }
}

impl DeployRequest {
    /// The plan the request describes, or what is wrong with it (named).
    fn plan(&self) -> Result<Plan, ServingError> {
        let invalid = |m: String| ServingError::InvalidInput(m);
        let (percents, hold) = match (&self.steps, self.traffic_percentage) {
            (Some(_), Some(_)) => {
                return Err(invalid("give steps or traffic_percentage, not both".into()));
            }
            (Some(steps), None) => (steps.clone(), false),
            (None, Some(share)) => (vec![share], share < 100.0),
            (None, None) => (DEFAULT_STEPS.to_vec(), false),
        };
        if percents.is_empty() {
            return Err(invalid("steps is empty".into()));
        }
        let mut steps = Vec::with_capacity(percents.len());
        for (i, percent) in percents.iter().enumerate() {
            if !(*percent > 0.0 && *percent <= 100.0) {
                return Err(invalid(format!(
                    "steps[{i}] is {percent}: a step is a share of traffic above 0 and at most 100 (percent)"
                )));
            }
            let share = Share::from_percent(*percent).map_err(|e| invalid(e.to_string()))?;
            if steps.last().is_some_and(|last| *last >= share) {
                return Err(invalid(format!(
                    "steps[{i}] is {percent}: steps must increase"
                )));
            }
            steps.push(share);
        }
        if let Some(seconds) = self.step_seconds
            && !(seconds > 0.0 && seconds.is_finite())
        {
            return Err(invalid(format!(
                "step_seconds must be a positive number, not {seconds}"
            )));
        }
        if self.step_requests == Some(0) {
            return Err(invalid("step_requests must be at least 1".into()));
        }
        self.guardrails.check().map_err(invalid)?;
        let entity = self
            .entity
            .clone()
            .unwrap_or_else(|| DEFAULT_SPLIT_ENTITY.into());
        if entity.is_empty() {
            return Err(invalid(
                "entity must name the id a user split hashes, e.g. user_id".into(),
            ));
        }
        let step_seconds = match (self.step_seconds, self.step_requests) {
            (None, None) => Some(DEFAULT_STEP_SECONDS),
            (seconds, _) => seconds,
        };
        Ok(Plan {
            steps,
            step_seconds,
            step_requests: self.step_requests,
            guardrails: self.guardrails.clone(),
            shadow: self.shadow,
            entity,
            hold,
        })
    }
}

impl Deployments {
    pub fn new(models: Arc<ModelManager>, router: Arc<Router>, events: Option<EventLog>) -> Self {
        Self {
            models,
            router,
            active: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(BTreeMap::new()),
            handing_over: Mutex::new(BTreeMap::new()),
            events,
        }
    }

    /// Announces a decision just written: `model.rolled_back` for a rollback, `model.deployed`
    /// for every other step of a deployment. Only the server whose write won announces it.
    fn announce(&self, deployment: &Deployment) {
        let (Some(events), Some(decision)) = (&self.events, deployment.decisions.last()) else {
            return;
        };
        let kind = if decision.action == Action::RolledBack {
            "model.rolled_back"
        } else {
            "model.deployed"
        };
        let fields = json!({
            "deployment_id": deployment.id,
            "model": deployment.model,
            "version": deployment.version,
            "control": deployment.control,
            "status": deployment.status,
            "action": decision.action,
            "share": decision.share,
            "step": deployment.step,
            "by": decision.by,
            "reason": decision.reason,
            "revision": deployment.revision,
        });
        let Value::Object(fields) = fields else {
            unreachable!("a JSON object literal")
        };
        events.log(Record::event(kind, &deployment.model, now_ms(), fields));
    }

    fn registry(&self) -> Result<&Registry, ServingError> {
        self.models.registry().ok_or_else(|| {
            ServingError::Unsupported(
                "canary deployments need a registry (marquee serve --registry): their state and the versions they move live there".into(),
            )
        })
    }

    /// Starts a deployment of `request.version` against the model's production version.
    pub async fn start(
        &self,
        model: &str,
        request: DeployRequest,
    ) -> Result<Deployment, ServingError> {
        let registry = self.registry()?;
        let plan = request.plan()?;
        let refs = registry.refs(model).await.map_err(registry_error)?;
        let control = *refs.aliases.get(Stage::Production.name()).ok_or_else(|| {
            ServingError::InvalidInput(format!(
                "model '{model}' has no production version to compare a canary with; promote one first"
            ))
        })?;
        if request.version == control {
            return Err(ServingError::InvalidInput(format!(
                "version {} of '{model}' is already in production",
                request.version
            )));
        }
        let manifest = registry
            .manifest(model, request.version)
            .await
            .map_err(registry_error)?;
        let failures = manifest.gate_failures();
        if !failures.is_empty() {
            return Err(ServingError::InvalidInput(format!(
                "{model} v{} could never be promoted: {}",
                request.version,
                failures.join("; ")
            )));
        }
        let existing = registry
            .deployments_from(model, 0)
            .await
            .map_err(registry_error)?;
        let number = match existing.last() {
            Some(&(number, revision)) => {
                if let Some(record) = registry
                    .deployment_after(model, number, revision - 1)
                    .await
                    .map_err(registry_error)?
                {
                    let last: Deployment = parse(&record.state, record.revision)?;
                    if !last.status.is_final() {
                        return Err(ServingError::Conflict(format!(
                            "deployment {} of '{model}' is still {:?}; promote it or roll it back first",
                            last.id, last.status
                        )));
                    }
                }
                number + 1
            }
            None => 1,
        };
        let by = request.by.clone().unwrap_or_else(|| "deploy-api".into());
        let mut not_applied = BTreeMap::new();
        for (field, value) in [
            ("replicas", &request.replicas),
            ("instance_type", &request.instance_type),
        ] {
            if let Some(value) = value {
                not_applied.insert(field.to_string(), value.clone());
            }
        }
        let id = format!("{model}-{number}");
        let mut deployment = Deployment {
            id: id.clone(),
            model: model.to_string(),
            number,
            version: request.version,
            control,
            plan,
            status: Status::Starting,
            step: 0,
            step_started_ms: now_ms(),
            paused_from: None,
            created_at: marquee_registry::now(),
            created_by: by.clone(),
            not_applied,
            decisions: Vec::new(),
            revision: 0,
        };
        deployment.decisions.push(Decision {
            at: marquee_registry::now(),
            by: by.clone(),
            action: Action::Started,
            share: 0.0,
            reason: request.reason.clone().unwrap_or_else(|| {
                format!("canary v{} against production v{control}", request.version)
            }),
            windows: None,
        });
        let record = registry
            .write_deployment(model, number, 1, &to_json(&deployment))
            .await
            .map_err(|e| match e {
                RegistryError::Conflict(_) => ServingError::Conflict(format!(
                    "another deployment of '{model}' started at the same moment; look at GET /v1/deployments"
                )),
                other => registry_error(other),
            })?;
        deployment.revision = record.revision;
        self.announce(&deployment);
        registry
            .set_alias(
                model,
                CANARY_ALIAS,
                request.version,
                &by,
                &format!("deployment {id}"),
            )
            .await
            .map_err(registry_error)?;
        tracing::info!(deployment = %id, version = request.version, control, "deployment started");
        self.remember(deployment.clone());
        Ok(deployment)
    }

    fn remember(&self, deployment: Deployment) {
        self.router
            .allow_entity(&deployment.model, &deployment.plan.entity);
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(deployment.model.clone())
            .and_modify(|n| *n = (*n).max(deployment.number))
            .or_insert(deployment.number);
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if deployment.status.is_final() {
            active.remove(&deployment.model);
        } else {
            active.insert(deployment.model.clone(), deployment);
        }
    }

    /// A deployment as the registry has it, with this server's live windows.
    pub async fn get(&self, id: &str) -> Result<(Deployment, Value), ServingError> {
        let (model, number) = parse_id(id)?;
        let registry = self.registry()?;
        let record = registry
            .deployment_after(model, number, 0)
            .await
            .map_err(registry_error)?
            .ok_or_else(|| ServingError::NotFound(format!("deployment '{id}' is not found")))?;
        let deployment = parse(&record.state, record.revision)?;
        let live = if deployment.status.is_final() {
            Value::Null
        } else {
            windows_json(&self.router.windows(model))
        };
        Ok((deployment, live))
    }

    /// The latest deployment of every model that has one.
    pub async fn list(&self) -> Result<Vec<Deployment>, ServingError> {
        let registry = self.registry()?;
        let mut out = Vec::new();
        for model in registry.models().await.map_err(registry_error)? {
            for (number, _) in registry
                .deployments_from(&model, 0)
                .await
                .map_err(registry_error)?
            {
                if let Some(record) = registry
                    .deployment_after(&model, number, 0)
                    .await
                    .map_err(registry_error)?
                {
                    out.push(parse(&record.state, record.revision)?);
                }
            }
        }
        Ok(out)
    }

    /// An operator's promote, rollback, pause or resume.
    pub async fn act(
        &self,
        id: &str,
        action: Action,
        by: &str,
        reason: &str,
    ) -> Result<Deployment, ServingError> {
        let (model, number) = parse_id(id)?;
        let registry = self.registry()?;
        loop {
            let record = registry
                .deployment_after(model, number, 0)
                .await
                .map_err(registry_error)?
                .ok_or_else(|| ServingError::NotFound(format!("deployment '{id}' is not found")))?;
            let current = parse(&record.state, record.revision)?;
            if current.status.is_final() {
                return Err(ServingError::Conflict(format!(
                    "deployment {id} is already {:?}",
                    current.status
                )));
            }
            let mut next = current.clone();
            match action {
                Action::Paused if current.status == Status::Paused => {
                    return Err(ServingError::Conflict(format!(
                        "deployment {id} is already paused"
                    )));
                }
                Action::Paused => {
                    next.paused_from = Some(current.status);
                    next.status = Status::Paused;
                }
                Action::Resumed => {
                    let Some(from) = current.paused_from else {
                        return Err(ServingError::Conflict(format!(
                            "deployment {id} is not paused"
                        )));
                    };
                    next.status = from;
                    next.paused_from = None;
                    next.step_started_ms = now_ms();
                }
                Action::Promoted => {
                    self.promote_in_registry(registry, &current, by).await?;
                    next.status = Status::Promoted;
                }
                Action::RolledBack => {
                    next.status = Status::RolledBack;
                }
                other => {
                    return Err(ServingError::InvalidInput(format!(
                        "{other:?} is not an operator action"
                    )));
                }
            }
            next.decisions.push(Decision {
                at: marquee_registry::now(),
                by: by.to_string(),
                action,
                share: next.share().percent(),
                reason: reason.to_string(),
                windows: Some(windows_json(&self.router.windows(model))),
            });
            match self.write(registry, next).await {
                Ok(written) => {
                    if written.status.is_final() {
                        self.finish(registry, &written).await;
                    }
                    return Ok(written);
                }
                // Another server decided first: look again at what it decided.
                Err(ServingError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the next revision of a deployment; `Conflict` when another server wrote it first.
    async fn write(
        &self,
        registry: &Registry,
        mut next: Deployment,
    ) -> Result<Deployment, ServingError> {
        let revision = next.revision + 1;
        let record = registry
            .write_deployment(&next.model, next.number, revision, &to_json(&next))
            .await
            .map_err(registry_error)?;
        next.revision = record.revision;
        self.announce(&next);
        tracing::info!(
            deployment = %next.id,
            status = ?next.status,
            share = next.share().percent(),
            reason = next.decisions.last().map(|d| d.reason.as_str()).unwrap_or(""),
            "deployment decision"
        );
        self.remember(next.clone());
        Ok(next)
    }

    /// Moves production to the canary version: staging first when it is in dev, the deployment
    /// being the approval.
    async fn promote_in_registry(
        &self,
        registry: &Registry,
        deployment: &Deployment,
        by: &str,
    ) -> Result<(), ServingError> {
        let refs = registry
            .refs(&deployment.model)
            .await
            .map_err(registry_error)?;
        let reason = format!("deployment {} promoted", deployment.id);
        if refs.stage(deployment.version) == Stage::Dev {
            registry
                .promote(
                    &deployment.model,
                    deployment.version,
                    Stage::Staging,
                    None,
                    by,
                    &reason,
                )
                .await
                .map_err(registry_error)?;
        }
        if refs.aliases.get(Stage::Production.name()) != Some(&deployment.version) {
            let approval = format!("{} (deployment {})", deployment.created_by, deployment.id);
            registry
                .promote(
                    &deployment.model,
                    deployment.version,
                    Stage::Production,
                    Some(&approval),
                    by,
                    &reason,
                )
                .await
                .map_err(registry_error)?;
        }
        Ok(())
    }

    /// After a final decision: the canary alias goes (a rolled-back version unloads at the next
    /// poll; a promoted one is production now) and the traffic policy with it, at once after a
    /// rollback, once production moved here after a promotion.
    async fn finish(&self, registry: &Registry, deployment: &Deployment) {
        let refs = registry.refs(&deployment.model).await;
        if refs.is_ok_and(|r| r.aliases.get(CANARY_ALIAS) == Some(&deployment.version))
            && let Err(error) = registry
                .remove_alias(
                    &deployment.model,
                    CANARY_ALIAS,
                    &deployment.created_by,
                    &format!("deployment {} {:?}", deployment.id, deployment.status),
                )
                .await
        {
            tracing::warn!(deployment = %deployment.id, %error, "the canary alias could not be removed");
        }
        if deployment.status == Status::Promoted {
            self.hand_over(deployment.clone());
        } else if self
            .router
            .policy(&deployment.model)
            .is_some_and(|p| p.salt == deployment.id)
        {
            self.router.clear(&deployment.model);
        }
    }

    /// Keeps a promoted deployment's users on its version until this server's default version
    /// is that version, then removes the policy.
    fn hand_over(&self, deployment: Deployment) {
        let model = deployment.model.clone();
        let default = self.models.get(&model, "").map(|m| m.spec().version).ok();
        let ours = self
            .router
            .policy(&model)
            .is_none_or(|p| p.salt == deployment.id);
        let mut handing_over = self.handing_over.lock().unwrap_or_else(|p| p.into_inner());
        if default == Some(deployment.version) || !ours {
            if ours {
                self.router.clear(&model);
            }
            handing_over.remove(&model);
            return;
        }
        if let Some(policy) = deployment.policy()
            && self.router.policy(&model).as_ref() != Some(&policy)
            && let Err(error) = self.router.set(&model, policy)
        {
            tracing::warn!(deployment = %deployment.id, %error, "promoted traffic not set");
        }
        handing_over.insert(model, deployment);
    }

    /// One round of the controller: reads new deployments and new revisions from the registry,
    /// sets each active deployment's traffic, and judges it. `discover` also lists every model's
    /// deployments (new ones started on other servers).
    pub async fn tick(&self, discover: bool) {
        let Ok(registry) = self.registry() else {
            return;
        };
        if discover {
            self.discover(registry).await;
        }
        let promoted: Vec<Deployment> = self
            .handing_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for deployment in promoted {
            self.hand_over(deployment);
        }
        let active: Vec<Deployment> = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for deployment in active {
            let latest = match registry
                .deployment_after(&deployment.model, deployment.number, deployment.revision)
                .await
            {
                Ok(Some(record)) => match parse(&record.state, record.revision) {
                    Ok(newer) => newer,
                    Err(error) => {
                        tracing::warn!(deployment = %deployment.id, %error, "unreadable deployment state");
                        continue;
                    }
                },
                Ok(None) => deployment,
                Err(error) => {
                    tracing::warn!(deployment = %deployment.id, %error, "deployment state not read");
                    continue;
                }
            };
            if latest.status.is_final() {
                self.finish(registry, &latest).await;
                self.remember(latest);
                continue;
            }
            self.remember(latest.clone());
            if let Err(error) = self.step(registry, latest).await {
                tracing::warn!(%error, "deployment step");
            }
        }
    }

    async fn discover(&self, registry: &Registry) {
        let Ok(models) = registry.models().await else {
            return;
        };
        for model in models {
            let from = self
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&model)
                .copied()
                .unwrap_or(0);
            let Ok(found) = registry.deployments_from(&model, from).await else {
                continue;
            };
            let Some(&(number, revision)) = found.last() else {
                continue;
            };
            if let Ok(Some(record)) = registry
                .deployment_after(&model, number, revision - 1)
                .await
                && let Ok(deployment) = parse(&record.state, record.revision)
            {
                if deployment.status.is_final() {
                    self.seen
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(model.clone(), number);
                    // A server that decided may have stopped before it tidied up.
                    self.finish(registry, &deployment).await;
                } else {
                    self.remember(deployment);
                }
            }
        }
    }

    /// Sets a deployment's traffic and judges its current step.
    async fn step(&self, registry: &Registry, deployment: Deployment) -> Result<(), ServingError> {
        let model = deployment.model.clone();
        let loaded = self.models.versions(&model);
        if deployment.status == Status::Starting {
            if loaded.contains(&deployment.version) && loaded.contains(&deployment.control) {
                let mut next = deployment.clone();
                next.status = if next.plan.shadow {
                    Status::Shadow
                } else {
                    Status::Progressing
                };
                next.step_started_ms = now_ms();
                next.decisions.push(Decision {
                    at: marquee_registry::now(),
                    by: "marquee".into(),
                    action: Action::Loaded,
                    share: next.share().percent(),
                    reason: format!(
                        "v{} is loaded; {}",
                        next.version,
                        if next.plan.shadow {
                            "mirroring traffic to it".to_string()
                        } else {
                            format!("{}% of users on it", next.share().percent())
                        }
                    ),
                    windows: None,
                });
                return self.write_or_follow(registry, next).await;
            }
            let waited =
                Duration::from_millis((now_ms() - deployment.step_started_ms).max(0) as u64);
            if waited > LOAD_PATIENCE {
                let reason = self
                    .models
                    .refused(&model, deployment.version)
                    .unwrap_or_else(|| "it did not load".into());
                return self
                    .roll_back(
                        registry,
                        deployment,
                        format!(
                            "v{} is not serving after {} s: {reason}",
                            LOAD_PATIENCE.as_secs(),
                            waited.as_secs()
                        ),
                        None,
                    )
                    .await;
            }
            return Ok(());
        }
        // The traffic this state asks for, once this server serves both versions (a server that
        // follows another's decision loads the canary at its next registry poll; until then its
        // users stay on production rather than meet a version it cannot answer with).
        let here = |version: u64| loaded.contains(&version);
        let routable = deployment
            .policy()
            .filter(|_| here(deployment.version) && here(deployment.control));
        match routable {
            Some(policy) if self.router.policy(&model).as_ref() != Some(&policy) => {
                self.router.set(&model, policy)?;
                return Ok(());
            }
            None => {
                if self
                    .router
                    .policy(&model)
                    .is_some_and(|p| p.salt == deployment.id)
                {
                    self.router.clear(&model);
                }
                return Ok(());
            }
            Some(_) => {}
        }
        let windows = self.router.windows(&model);
        let empty = Window::default();
        let canary_name = if deployment.status == Status::Shadow {
            SHADOW
        } else {
            CANARY
        };
        let canary = windows.get(canary_name).unwrap_or(&empty);
        let control = windows.get(CONTROL).unwrap_or(&empty);
        let verdict = judge::judge(canary, control, &deployment.plan.guardrails);
        if let Verdict::Fail(reason) = verdict {
            return self
                .roll_back(registry, deployment, reason, Some(windows_json(&windows)))
                .await;
        }
        let Verdict::Pass(evidence) = verdict else {
            return Ok(());
        };
        if matches!(deployment.status, Status::Paused | Status::Holding) {
            return Ok(());
        }
        let elapsed = (now_ms() - deployment.step_started_ms).max(0) as f64 / 1e3;
        let time_done = deployment.plan.step_seconds.is_none_or(|s| elapsed >= s);
        let requests_done = deployment
            .plan
            .step_requests
            .is_none_or(|n| canary.requests >= n);
        if !(time_done && requests_done) {
            return Ok(());
        }
        let mut next = deployment.clone();
        let last = next.step + 1 == next.plan.steps.len();
        let action = match next.status {
            Status::Shadow => {
                next.status = Status::Progressing;
                Action::ShadowPassed
            }
            _ if !last => {
                next.step += 1;
                Action::Advanced
            }
            _ if next.plan.hold || next.plan.steps[next.step] < Share::ALL => {
                next.status = Status::Holding;
                Action::Held
            }
            _ => {
                self.promote_in_registry(registry, &deployment, "marquee")
                    .await?;
                next.status = Status::Promoted;
                Action::Promoted
            }
        };
        next.step_started_ms = now_ms();
        next.decisions.push(Decision {
            at: marquee_registry::now(),
            by: "marquee".into(),
            action,
            share: next.share().percent(),
            reason: evidence,
            windows: Some(windows_json(&windows)),
        });
        self.write_or_follow(registry, next).await
    }

    async fn roll_back(
        &self,
        registry: &Registry,
        deployment: Deployment,
        reason: String,
        windows: Option<Value>,
    ) -> Result<(), ServingError> {
        let mut next = deployment;
        next.status = Status::RolledBack;
        next.decisions.push(Decision {
            at: marquee_registry::now(),
            by: "marquee".into(),
            action: Action::RolledBack,
            share: 0.0,
            reason,
            windows,
        });
        // Stop sending users to the canary before anything else.
        if self
            .router
            .policy(&next.model)
            .is_some_and(|p| p.salt == next.id)
        {
            self.router.clear(&next.model);
        }
        self.write_or_follow(registry, next).await
    }

    /// Writes a decision; when another server decided first, its decision stands (read at the
    /// next tick).
    async fn write_or_follow(
        &self,
        registry: &Registry,
        next: Deployment,
    ) -> Result<(), ServingError> {
        match self.write(registry, next).await {
            Ok(written) => {
                if written.status.is_final() {
                    self.finish(registry, &written).await;
                }
                Ok(())
            }
            Err(ServingError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn to_json(deployment: &Deployment) -> Value {
    serde_json::to_value(deployment).expect("a deployment serializes")
}

fn parse(state: &Value, revision: u64) -> Result<Deployment, ServingError> {
    let mut deployment: Deployment = serde_json::from_value(state.clone())
        .map_err(|e| ServingError::Internal(format!("a stored deployment cannot be read: {e}")))?;
    deployment.revision = revision;
    Ok(deployment)
}
