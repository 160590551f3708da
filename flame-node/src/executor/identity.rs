//! Who an executor runs as: the Unix identity the node's mode (`--executor-identity`) or
//! the application's `user` gives an owner, with the checks that keep owners apart and root
//! out unless both the node and the application allow it.

use super::Settings;
use crate::launcher::{resolve_credentials, Credentials};
use flame_protocol::model::{ApplicationSpec, ExecutorIdentity, ExecutorOwner};

/// How a node picks the Unix identity of an owner's executors (`--executor-identity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMode {
    /// The owner's uid from the head's reserved range, gid the same number, no
    /// supplementary groups (the default).
    OwnerUid,
    /// The Unix user named like the owner (site accounts, as Slurm does).
    SiteUser,
    /// One user for every owner (`--executor-user`): owners are not isolated.
    Fixed(String),
    /// The agent is not root: every executor runs as the agent's own user.
    Unprivileged(String),
}

impl IdentityMode {
    /// What the node tells the head at registration (`flame node list` shows it).
    pub fn reported(&self) -> ExecutorIdentity {
        match self {
            IdentityMode::OwnerUid => ExecutorIdentity::OwnerUid,
            IdentityMode::SiteUser => ExecutorIdentity::SiteUser,
            IdentityMode::Fixed(user) => ExecutorIdentity::Fixed { user: user.clone() },
            IdentityMode::Unprivileged(user) => {
                ExecutorIdentity::Unprivileged { user: user.clone() }
            }
        }
    }
}

/// Who an executor of `owner` runs as on this node: the application's `user` when it
/// names one (the head accepts that only for an application restricted to one owner),
/// else the identity the node's mode gives the owner. `work_dir` is its private working
/// directory, the `HOME` of an owner uid that has no passwd entry.
pub(super) fn credentials_for(
    settings: &Settings,
    app: &ApplicationSpec,
    owner: &ExecutorOwner,
    work_dir: &std::path::Path,
) -> Result<Option<Credentials>, String> {
    if !settings.node_is_root {
        // An unprivileged agent runs executors as itself.
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name);
        return match (&app.user, me) {
            (Some(wanted), Some(me)) if *wanted != me => Err(format!(
                "this node runs as `{me}`, not root, so it cannot run executors as `{wanted}`"
            )),
            _ => Ok(None),
        };
    }
    if app.user.is_some() || app.group.is_some() {
        // A fixed identity may serve one owner only, or every owner on a node that shares
        // one identity by choice: the head checks this at registration and launch, and the
        // node holds it too, since it is what keeps two owners apart here.
        let one_owner = app.users.len() == 1 && app.users[0] == owner.name && app.groups.is_empty();
        if !one_owner && !matches!(settings.identity, IdentityMode::Fixed(_)) {
            return Err(format!(
                "application `{}` names a fixed user or group but is not restricted to `{}` \
                 alone; refusing to run two owners' executors as one identity\n\
                 hint: an admin sets `users = [\"{}\"]` (and no `groups`) on it, or leaves \
                 out `user` and `group`",
                app.name, owner.name, owner.name
            ));
        }
    }
    let (user, credentials) = match (&app.user, &settings.identity) {
        (Some(user), _) => (
            user.clone(),
            resolve_credentials(user, app.group.as_deref())
                .map_err(|e| format!("cannot run as the application's user: {e}"))?,
        ),
        (None, IdentityMode::Fixed(user)) => (
            user.clone(),
            resolve_credentials(user, app.group.as_deref())
                .map_err(|e| format!("cannot run as this node's --executor-user: {e}"))?,
        ),
        (None, IdentityMode::SiteUser) => (
            owner.name.clone(),
            resolve_credentials(&owner.name, app.group.as_deref()).map_err(|e| {
                format!(
                    "this node runs each user's executors as the Unix user of the same name \
                     (--executor-identity site-user), and cannot for `{}`: {e}\n\
                     hint: create the account `{}` on node {}, or run the node with \
                     --executor-identity owner-uid",
                    owner.name, owner.name, settings.node_name
                )
            })?,
        ),
        (None, IdentityMode::OwnerUid) => (
            format!("flame-{}", owner.name),
            owner_uid_credentials(settings, app, owner, work_dir)?,
        ),
        // Handled above: an unprivileged agent runs executors as itself.
        (None, IdentityMode::Unprivileged(user)) => {
            return Err(format!(
                "this node runs as `{user}`, not root; it cannot change identity"
            ))
        }
    };
    if matches!(settings.identity, IdentityMode::SiteUser)
        && app.user.is_none()
        && credentials.uid != 0
        && credentials.uid < SITE_USER_UID_MIN
    {
        return Err(format!(
            "`{user}` is a system account (uid {} below {SITE_USER_UID_MIN}); site-user mode \
             runs only people's accounts\nhint: give the Flame user another name",
            credentials.uid
        ));
    }
    if credentials.uid == 0 && !(settings.allow_root && app.allow_root) {
        let who = match (settings.allow_root, app.allow_root) {
            (false, false) => {
                "neither the application (`allow_root = true` in its file) nor this node \
                 (`flame-node --allow-root-executors`) allows it"
            }
            (false, true) => "this node does not allow it (`flame-node --allow-root-executors`)",
            _ => "the application does not allow it (`allow_root = true` in its file)",
        };
        return Err(format!(
            "`{user}` is root, and executors run as root only when both the application \
             and the node allow it: {who}"
        ));
    }
    Ok(Some(credentials))
}

/// In site-user mode, the lowest uid an owner's account may have: below it are system
/// accounts (`bin`, `daemon`, ...), which a Flame user of that name must not become
/// (Debian's and most distributions' `UID_MIN`).
pub const SITE_USER_UID_MIN: u32 = 1000;

/// The owner's head-assigned uid, with the gid of the same number (or the application's
/// `group`) and no other group. A uid that is a local account's, or 0, is refused: the
/// head's range must be free on every node.
fn owner_uid_credentials(
    settings: &Settings,
    app: &ApplicationSpec,
    owner: &ExecutorOwner,
    work_dir: &std::path::Path,
) -> Result<Credentials, String> {
    let uid = owner.uid;
    if uid == 0 {
        return Err(format!(
            "the head gave owner `{}` uid 0; refusing",
            owner.name
        ));
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(None) => {}
        Ok(Some(local)) => {
            return Err(format!(
                "uid {uid} of owner `{}` is the local account `{}` on node {}\n\
                 hint: give the head an --owner-uid-range that no account on the nodes uses",
                owner.name, local.name, settings.node_name
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot look up uid {uid} in the user database: {e}"
            ))
        }
    }
    let gid = match &app.group {
        None => uid,
        Some(g) => nix::unistd::Group::from_name(g)
            .map_err(|e| format!("cannot look up group `{g}`: {e}"))?
            .ok_or_else(|| format!("the application's group `{g}` does not exist on this node"))?
            .gid
            .as_raw(),
    };
    Ok(Credentials {
        uid,
        gid,
        groups: vec![gid],
        user: format!("flame-{}", owner.name),
        home: work_dir.to_path_buf(),
    })
}
