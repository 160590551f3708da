//! Conversions between the records and the head's own types, both ways. Every one
//! destructures its source, so that a field added on either side stops the build here
//! rather than being dropped or defaulted silently: whoever adds it decides whether the
//! store keeps it (a new record and a schema bump) or not.

use super::*;
use crate::auth::StoredToken;
use crate::certs::StoredCert;
use crate::store::{StoredNode, StoredSession, StoredTask};
use flame_protocol::auth::TokenKind;
use flame_protocol::model::DataStats;
use flame_protocol::model::{
    ApplicationSpec, EnvValue, ExecutorUsage, GpuInfo, JobFailure, JobInfo, JobSpec, JobState,
    NodeResources, RankInfo, Resources, SessionInfo, SessionState, ShimKind, TaskCounts,
    TaskOutcome,
};
use flame_protocol::object::{ObjectId, ObjectRef, Payload};
use flame_protocol::{ExecutorId, SessionId};

impl From<ShimKind> for ShimRecord {
    fn from(v: ShimKind) -> Self {
        match v {
            ShimKind::Stdio => ShimRecord::Stdio,
            ShimKind::Unix => ShimRecord::Unix,
            ShimKind::Batch => ShimRecord::Batch,
        }
    }
}

impl From<ShimRecord> for ShimKind {
    fn from(v: ShimRecord) -> Self {
        match v {
            ShimRecord::Stdio => ShimKind::Stdio,
            ShimRecord::Unix => ShimKind::Unix,
            ShimRecord::Batch => ShimKind::Batch,
        }
    }
}

impl From<&EnvValue> for EnvRecord {
    fn from(v: &EnvValue) -> Self {
        let EnvValue { value, secret } = v;
        EnvRecord {
            value: value.clone(),
            secret: *secret,
        }
    }
}

impl From<EnvRecord> for EnvValue {
    fn from(v: EnvRecord) -> Self {
        let EnvRecord { value, secret } = v;
        EnvValue { value, secret }
    }
}

impl From<Resources> for ResourcesRecord {
    fn from(v: Resources) -> Self {
        let Resources {
            cpu_millis,
            memory_bytes,
            gpus,
        } = v;
        ResourcesRecord {
            cpu_millis,
            memory_bytes,
            gpus,
        }
    }
}

impl From<ResourcesRecord> for Resources {
    fn from(v: ResourcesRecord) -> Self {
        let ResourcesRecord {
            cpu_millis,
            memory_bytes,
            gpus,
        } = v;
        Resources {
            cpu_millis,
            memory_bytes,
            gpus,
        }
    }
}

impl From<&ApplicationSpec> for ApplicationRecord {
    fn from(v: &ApplicationSpec) -> Self {
        let ApplicationSpec {
            name,
            shim,
            command,
            args,
            env,
            working_dir,
            user,
            group,
            users,
            groups,
            resources,
            selector,
            max_instances,
            delay_release_ms,
            max_attempts,
            retry_on_error,
            task_timeout_ms,
            allow_root,
        } = v;
        ApplicationRecord {
            name: name.clone(),
            shim: (*shim).into(),
            command: command.clone(),
            args: args.clone(),
            env: env.iter().map(|(k, v)| (k.clone(), v.into())).collect(),
            working_dir: working_dir.clone(),
            user: user.clone(),
            group: group.clone(),
            users: users.clone(),
            groups: groups.clone(),
            resources: (*resources).into(),
            selector: selector.clone(),
            max_instances: *max_instances,
            delay_release_ms: *delay_release_ms,
            max_attempts: *max_attempts,
            retry_on_error: *retry_on_error,
            task_timeout_ms: *task_timeout_ms,
            allow_root: *allow_root,
        }
    }
}

impl From<ApplicationRecord> for ApplicationSpec {
    fn from(v: ApplicationRecord) -> Self {
        let ApplicationRecord {
            name,
            shim,
            command,
            args,
            env,
            working_dir,
            user,
            group,
            users,
            groups,
            resources,
            selector,
            max_instances,
            delay_release_ms,
            max_attempts,
            retry_on_error,
            task_timeout_ms,
            allow_root,
        } = v;
        ApplicationSpec {
            name,
            shim: shim.into(),
            command,
            args,
            env: env.into_iter().map(|(k, v)| (k, v.into())).collect(),
            working_dir,
            user,
            group,
            users,
            groups,
            resources: resources.into(),
            selector,
            max_instances,
            delay_release_ms,
            max_attempts,
            retry_on_error,
            task_timeout_ms,
            allow_root,
        }
    }
}

impl From<SessionState> for SessionStateRecord {
    fn from(v: SessionState) -> Self {
        match v {
            SessionState::Open => SessionStateRecord::Open,
            SessionState::Closed => SessionStateRecord::Closed,
        }
    }
}

impl From<SessionStateRecord> for SessionState {
    fn from(v: SessionStateRecord) -> Self {
        match v {
            SessionStateRecord::Open => SessionState::Open,
            SessionStateRecord::Closed => SessionState::Closed,
        }
    }
}

impl From<&ExecutorUsage> for UsageRecord {
    fn from(v: &ExecutorUsage) -> Self {
        let ExecutorUsage {
            executor,
            node,
            bound_ms,
            cpu_ms,
            memory_peak_bytes,
            throttled_ms,
            ended,
        } = v;
        UsageRecord {
            executor: executor.0,
            node: node.clone(),
            bound_ms: *bound_ms,
            cpu_ms: *cpu_ms,
            memory_peak_bytes: *memory_peak_bytes,
            throttled_ms: *throttled_ms,
            ended: ended.clone(),
        }
    }
}

impl From<UsageRecord> for ExecutorUsage {
    fn from(v: UsageRecord) -> Self {
        let UsageRecord {
            executor,
            node,
            bound_ms,
            cpu_ms,
            memory_peak_bytes,
            throttled_ms,
            ended,
        } = v;
        ExecutorUsage {
            executor: ExecutorId(executor),
            node,
            bound_ms,
            cpu_ms,
            memory_peak_bytes,
            throttled_ms,
            ended,
        }
    }
}

impl From<&JobSpec> for JobSpecRecord {
    fn from(v: &JobSpec) -> Self {
        let JobSpec {
            name,
            command,
            args,
            env,
            working_dir,
            ranks,
            ranks_per_node,
            resources,
            time_limit_ms,
            mpi,
        } = v;
        JobSpecRecord {
            name: name.clone(),
            command: command.clone(),
            args: args.clone(),
            env: env.clone(),
            working_dir: working_dir.clone(),
            ranks: *ranks,
            ranks_per_node: *ranks_per_node,
            resources: (*resources).into(),
            time_limit_ms: *time_limit_ms,
            mpi: *mpi,
        }
    }
}

impl From<JobSpecRecord> for JobSpec {
    fn from(v: JobSpecRecord) -> Self {
        let JobSpecRecord {
            name,
            command,
            args,
            env,
            working_dir,
            ranks,
            ranks_per_node,
            resources,
            time_limit_ms,
            mpi,
        } = v;
        JobSpec {
            name,
            command,
            args,
            env,
            working_dir,
            ranks,
            ranks_per_node,
            resources: resources.into(),
            time_limit_ms,
            mpi,
        }
    }
}

impl From<JobState> for JobStateRecord {
    fn from(v: JobState) -> Self {
        match v {
            JobState::Queued => JobStateRecord::Queued,
            JobState::Running => JobStateRecord::Running,
            JobState::Succeeded => JobStateRecord::Succeeded,
            JobState::Failed => JobStateRecord::Failed,
            JobState::Cancelled => JobStateRecord::Cancelled,
            JobState::TimedOut => JobStateRecord::TimedOut,
        }
    }
}

impl From<JobStateRecord> for JobState {
    fn from(v: JobStateRecord) -> Self {
        match v {
            JobStateRecord::Queued => JobState::Queued,
            JobStateRecord::Running => JobState::Running,
            JobStateRecord::Succeeded => JobState::Succeeded,
            JobStateRecord::Failed => JobState::Failed,
            JobStateRecord::Cancelled => JobState::Cancelled,
            JobStateRecord::TimedOut => JobState::TimedOut,
        }
    }
}

impl From<&RankInfo> for RankRecord {
    fn from(v: &RankInfo) -> Self {
        let RankInfo {
            rank,
            node,
            executor,
            local_rank,
            exit_code,
        } = v;
        RankRecord {
            rank: *rank,
            node: node.clone(),
            executor: executor.0,
            local_rank: *local_rank,
            exit_code: *exit_code,
        }
    }
}

impl From<RankRecord> for RankInfo {
    fn from(v: RankRecord) -> Self {
        let RankRecord {
            rank,
            node,
            executor,
            local_rank,
            exit_code,
        } = v;
        RankInfo {
            rank,
            node,
            executor: ExecutorId(executor),
            local_rank,
            exit_code,
        }
    }
}

impl From<&JobFailure> for JobFailureRecord {
    fn from(v: &JobFailure) -> Self {
        let JobFailure {
            rank,
            exit_code,
            message,
        } = v;
        JobFailureRecord {
            rank: *rank,
            exit_code: *exit_code,
            message: message.clone(),
        }
    }
}

impl From<JobFailureRecord> for JobFailure {
    fn from(v: JobFailureRecord) -> Self {
        let JobFailureRecord {
            rank,
            exit_code,
            message,
        } = v;
        JobFailure {
            rank,
            exit_code,
            message,
        }
    }
}

impl From<&JobInfo> for JobRecord {
    fn from(v: &JobInfo) -> Self {
        let JobInfo {
            spec,
            state,
            started_ms,
            ended_ms,
            ranks,
            failure,
        } = v;
        JobRecord {
            spec: spec.into(),
            state: (*state).into(),
            started_ms: *started_ms,
            ended_ms: *ended_ms,
            ranks: ranks.iter().map(RankRecord::from).collect(),
            failure: failure.as_ref().map(JobFailureRecord::from),
        }
    }
}

impl From<JobRecord> for JobInfo {
    fn from(v: JobRecord) -> Self {
        let JobRecord {
            spec,
            state,
            started_ms,
            ended_ms,
            ranks,
            failure,
        } = v;
        JobInfo {
            spec: spec.into(),
            state: state.into(),
            started_ms,
            ended_ms,
            ranks: ranks.into_iter().map(RankInfo::from).collect(),
            failure: failure.map(JobFailure::from),
        }
    }
}

impl From<&StoredSession> for SessionRecord {
    fn from(v: &StoredSession) -> Self {
        let StoredSession {
            id,
            application,
            owner,
            priority,
            common_data,
            state,
            created_ms,
            closed_ms,
            last_task,
            usage,
            job,
        } = v;
        SessionRecord {
            id: id.0,
            application: application.clone(),
            owner: owner.clone(),
            priority: *priority,
            common_data: common_data.into(),
            state: (*state).into(),
            created_ms: *created_ms,
            closed_ms: *closed_ms,
            last_task: *last_task,
            usage: usage.iter().map(UsageRecord::from).collect(),
            job: job.as_ref().map(JobRecord::from),
        }
    }
}

impl From<SessionRecord> for StoredSession {
    fn from(v: SessionRecord) -> Self {
        let SessionRecord {
            id,
            application,
            owner,
            priority,
            common_data,
            state,
            created_ms,
            closed_ms,
            last_task,
            usage,
            job,
        } = v;
        StoredSession {
            id: SessionId(id),
            application,
            owner,
            priority,
            common_data: common_data.into(),
            state: state.into(),
            created_ms,
            closed_ms,
            last_task,
            usage: usage.into_iter().map(ExecutorUsage::from).collect(),
            job: job.map(JobInfo::from),
        }
    }
}

impl From<ObjectRef> for ObjectRefRecord {
    fn from(v: ObjectRef) -> Self {
        let ObjectRef { id, size } = v;
        ObjectRefRecord { id: id.0, size }
    }
}

impl From<ObjectRefRecord> for ObjectRef {
    fn from(v: ObjectRefRecord) -> Self {
        let ObjectRefRecord { id, size } = v;
        ObjectRef {
            id: ObjectId(id),
            size,
        }
    }
}

impl From<&Payload> for PayloadRecord {
    fn from(v: &Payload) -> Self {
        match v {
            Payload::Inline(bytes) => PayloadRecord::Inline(bytes.clone()),
            Payload::Object(object) => PayloadRecord::Object((*object).into()),
        }
    }
}

impl From<PayloadRecord> for Payload {
    fn from(v: PayloadRecord) -> Self {
        match v {
            PayloadRecord::Inline(bytes) => Payload::Inline(bytes),
            PayloadRecord::Object(object) => Payload::Object(object.into()),
        }
    }
}

impl From<&TaskOutcome> for OutcomeRecord {
    fn from(v: &TaskOutcome) -> Self {
        match v {
            TaskOutcome::Succeeded(output) => OutcomeRecord::Succeeded(output.clone()),
            TaskOutcome::Failed(message) => OutcomeRecord::Failed(message.clone()),
            TaskOutcome::Cancelled => OutcomeRecord::Cancelled,
            TaskOutcome::Object(object) => OutcomeRecord::Object((*object).into()),
        }
    }
}

impl From<OutcomeRecord> for TaskOutcome {
    fn from(v: OutcomeRecord) -> Self {
        match v {
            OutcomeRecord::Succeeded(output) => TaskOutcome::Succeeded(output),
            OutcomeRecord::Failed(message) => TaskOutcome::Failed(message),
            OutcomeRecord::Cancelled => TaskOutcome::Cancelled,
            OutcomeRecord::Object(object) => TaskOutcome::Object(object.into()),
        }
    }
}

impl TaskRecord {
    /// The record of a pending task at `attempt` with `input`: inline inputs in schema 6's
    /// variant, objects in schema 7's.
    pub fn pending(attempt: u32, input: &Payload) -> TaskRecord {
        match input {
            Payload::Inline(bytes) => TaskRecord::Pending {
                attempt,
                input: bytes.clone(),
            },
            Payload::Object(object) => TaskRecord::PendingObject {
                attempt,
                input: (*object).into(),
            },
        }
    }
}

impl From<&StoredTask> for TaskRecord {
    fn from(v: &StoredTask) -> Self {
        match v {
            StoredTask::Pending { attempt, input } => TaskRecord::pending(*attempt, input),
            StoredTask::Final { attempt, outcome } => TaskRecord::Final {
                attempt: *attempt,
                outcome: outcome.into(),
            },
        }
    }
}

impl From<TaskRecord> for StoredTask {
    fn from(v: TaskRecord) -> Self {
        match v {
            TaskRecord::Pending { attempt, input } => StoredTask::Pending {
                attempt,
                input: Payload::Inline(input),
            },
            TaskRecord::PendingObject { attempt, input } => StoredTask::Pending {
                attempt,
                input: Payload::Object(input.into()),
            },
            TaskRecord::Final { attempt, outcome } => StoredTask::Final {
                attempt,
                outcome: outcome.into(),
            },
        }
    }
}

impl From<&GpuInfo> for GpuRecord {
    fn from(v: &GpuInfo) -> Self {
        let GpuInfo {
            index,
            name,
            uuid,
            memory_bytes,
        } = v;
        GpuRecord {
            index: *index,
            name: name.clone(),
            uuid: uuid.clone(),
            memory_bytes: *memory_bytes,
        }
    }
}

impl From<GpuRecord> for GpuInfo {
    fn from(v: GpuRecord) -> Self {
        let GpuRecord {
            index,
            name,
            uuid,
            memory_bytes,
        } = v;
        GpuInfo {
            index,
            name,
            uuid,
            memory_bytes,
        }
    }
}

impl From<&NodeResources> for NodeResourcesRecord {
    fn from(v: &NodeResources) -> Self {
        let NodeResources {
            cpu_millis,
            memory_bytes,
            gpus,
        } = v;
        NodeResourcesRecord {
            cpu_millis: *cpu_millis,
            memory_bytes: *memory_bytes,
            gpus: gpus.iter().map(GpuRecord::from).collect(),
        }
    }
}

impl From<NodeResourcesRecord> for NodeResources {
    fn from(v: NodeResourcesRecord) -> Self {
        let NodeResourcesRecord {
            cpu_millis,
            memory_bytes,
            gpus,
        } = v;
        NodeResources {
            cpu_millis,
            memory_bytes,
            gpus: gpus.into_iter().map(GpuInfo::from).collect(),
        }
    }
}

impl From<&StoredNode> for NodeRecord {
    fn from(v: &StoredNode) -> Self {
        let StoredNode {
            name,
            allocatable,
            labels,
            isolation,
            last_seen_ms,
            draining,
        } = v;
        NodeRecord {
            name: name.clone(),
            allocatable: allocatable.into(),
            labels: labels.clone(),
            isolation: *isolation,
            last_seen_ms: *last_seen_ms,
            draining: *draining,
        }
    }
}

impl From<NodeRecord> for StoredNode {
    fn from(v: NodeRecord) -> Self {
        let NodeRecord {
            name,
            allocatable,
            labels,
            isolation,
            last_seen_ms,
            draining,
        } = v;
        StoredNode {
            name,
            allocatable: allocatable.into(),
            labels,
            isolation,
            last_seen_ms,
            draining,
        }
    }
}

impl From<TaskCounts> for CountsRecord {
    fn from(v: TaskCounts) -> Self {
        let TaskCounts {
            pending,
            running,
            succeeded,
            failed,
            cancelled,
        } = v;
        CountsRecord {
            pending,
            running,
            succeeded,
            failed,
            cancelled,
        }
    }
}

impl From<CountsRecord> for TaskCounts {
    fn from(v: CountsRecord) -> Self {
        let CountsRecord {
            pending,
            running,
            succeeded,
            failed,
            cancelled,
        } = v;
        TaskCounts {
            pending,
            running,
            succeeded,
            failed,
            cancelled,
        }
    }
}

impl From<&SessionInfo> for FinishedRecord {
    fn from(v: &SessionInfo) -> Self {
        let SessionInfo {
            id,
            application,
            owner,
            priority,
            state,
            ephemeral,
            counts,
            executors,
            created_ms,
            closed_ms,
            waiting,
            usage,
            job,
            data,
        } = v;
        FinishedRecord {
            id: id.0,
            application: application.clone(),
            owner: owner.clone(),
            priority: *priority,
            state: (*state).into(),
            ephemeral: *ephemeral,
            counts: (*counts).into(),
            executors: *executors,
            created_ms: *created_ms,
            closed_ms: *closed_ms,
            waiting: waiting.clone(),
            usage: usage.iter().map(UsageRecord::from).collect(),
            job: job.as_ref().map(JobRecord::from),
            data: DataStatsRecord::from(*data),
        }
    }
}

impl From<DataStats> for DataStatsRecord {
    fn from(v: DataStats) -> Self {
        let DataStats {
            object_tasks,
            local_tasks,
            fetched_bytes,
            local_bytes,
        } = v;
        DataStatsRecord {
            object_tasks,
            local_tasks,
            fetched_bytes,
            local_bytes,
        }
    }
}

impl From<DataStatsRecord> for DataStats {
    fn from(v: DataStatsRecord) -> Self {
        let DataStatsRecord {
            object_tasks,
            local_tasks,
            fetched_bytes,
            local_bytes,
        } = v;
        DataStats {
            object_tasks,
            local_tasks,
            fetched_bytes,
            local_bytes,
        }
    }
}

impl From<FinishedRecord> for SessionInfo {
    fn from(v: FinishedRecord) -> Self {
        let FinishedRecord {
            id,
            application,
            owner,
            priority,
            state,
            ephemeral,
            counts,
            executors,
            created_ms,
            closed_ms,
            waiting,
            usage,
            job,
            data,
        } = v;
        SessionInfo {
            id: SessionId(id),
            application,
            owner,
            priority,
            state: state.into(),
            ephemeral,
            counts: counts.into(),
            executors,
            created_ms,
            closed_ms,
            waiting,
            usage: usage.into_iter().map(ExecutorUsage::from).collect(),
            job: job.map(JobInfo::from),
            data: DataStats::from(data),
        }
    }
}

impl From<&TokenKind> for TokenKindRecord {
    fn from(v: &TokenKind) -> Self {
        match v {
            TokenKind::Node => TokenKindRecord::Node,
            TokenKind::User { name, admin } => TokenKindRecord::User {
                name: name.clone(),
                admin: *admin,
            },
        }
    }
}

impl From<TokenKindRecord> for TokenKind {
    fn from(v: TokenKindRecord) -> Self {
        match v {
            TokenKindRecord::Node => TokenKind::Node,
            TokenKindRecord::User { name, admin } => TokenKind::User { name, admin },
        }
    }
}

impl From<&StoredToken> for TokenRecord {
    fn from(v: &StoredToken) -> Self {
        let StoredToken {
            kind,
            secret_sha256,
            created_ms,
            expires_ms,
            revoked,
            uses_max,
            uses,
            replace,
        } = v;
        TokenRecord {
            kind: kind.into(),
            secret_sha256: *secret_sha256,
            created_ms: *created_ms,
            expires_ms: *expires_ms,
            revoked: *revoked,
            uses_max: *uses_max,
            uses: *uses,
            replace: replace.clone(),
        }
    }
}

impl From<TokenRecord> for StoredToken {
    fn from(v: TokenRecord) -> Self {
        let TokenRecord {
            kind,
            secret_sha256,
            created_ms,
            expires_ms,
            revoked,
            uses_max,
            uses,
            replace,
        } = v;
        StoredToken {
            kind: kind.into(),
            secret_sha256,
            created_ms,
            expires_ms,
            revoked,
            uses_max,
            uses,
            replace,
        }
    }
}

impl From<&StoredCert> for CertificateRecord {
    fn from(v: &StoredCert) -> Self {
        match v.clone() {
            StoredCert::Revoked {
                serial,
                fingerprint,
                holder,
                revoked_ms,
            } => CertificateRecord::Revoked {
                serial,
                fingerprint,
                holder,
                revoked_ms,
            },
            StoredCert::Node {
                fingerprint,
                issued_ms,
                revoked_ms,
            } => CertificateRecord::Node {
                fingerprint,
                issued_ms,
                revoked_ms,
            },
        }
    }
}

impl From<CertificateRecord> for StoredCert {
    fn from(v: CertificateRecord) -> Self {
        match v {
            CertificateRecord::Revoked {
                serial,
                fingerprint,
                holder,
                revoked_ms,
            } => StoredCert::Revoked {
                serial,
                fingerprint,
                holder,
                revoked_ms,
            },
            CertificateRecord::Node {
                fingerprint,
                issued_ms,
                revoked_ms,
            } => StoredCert::Node {
                fingerprint,
                issued_ms,
                revoked_ms,
            },
        }
    }
}
