//! Authorization decisions, as Pulsar's `PulsarAuthorizationProvider` makes them:
//!
//! - a super-user role (`super_user_roles`) may do everything;
//! - a tenant's admin roles (`adminRoles`) may do everything on the tenant's namespaces and
//!   topics (administer, grant, produce, consume), not on other tenants or the cluster;
//! - any other role may produce or consume on a topic only with that permission, granted on
//!   the topic's namespace or on the topic itself (a partitioned topic's grants cover its
//!   partitions); looking a topic up needs either.
//!
//! Grants live in the namespace's policies as Pulsar keeps them (`auth_policies`:
//! `namespace_auth` role → actions, `destination_auth` topic → role → actions).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a role wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicAction {
    Produce,
    Consume,
    /// Lookup, partitioned metadata, schema reads: produce or consume suffices.
    Lookup,
}

impl TopicAction {
    fn name(self) -> &'static str {
        match self {
            TopicAction::Produce => "produce",
            TopicAction::Consume => "consume",
            TopicAction::Lookup => "produce or consume",
        }
    }

    fn granted_by(self, actions: &BTreeSet<String>) -> bool {
        match self {
            TopicAction::Produce => actions.contains("produce"),
            TopicAction::Consume => actions.contains("consume"),
            TopicAction::Lookup => actions.contains("produce") || actions.contains("consume"),
        }
    }
}

/// The actions that can be granted.
pub const GRANTABLE: &[&str] = &["produce", "consume"];

/// Pulsar's `AuthPolicies`, the `auth_policies` field of namespace policies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthPolicies {
    #[serde(default)]
    pub namespace_auth: BTreeMap<String, BTreeSet<String>>,
    #[serde(default)]
    pub destination_auth: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    #[serde(default)]
    pub subscription_auth_roles: BTreeMap<String, BTreeSet<String>>,
}

impl AuthPolicies {
    /// The grants stored in a namespace's policies (its `auth_policies` field), if any.
    pub fn from_policies(auth_policies: Option<&Value>) -> AuthPolicies {
        auth_policies
            .and_then(|value| serde_json::from_value(value.clone()).ok())
            .unwrap_or_default()
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// True if `role` may do `action` on `topic` (its base name, without `-partition-N`).
    pub fn allows(&self, role: &str, action: TopicAction, topic: &str) -> bool {
        let namespace = self
            .namespace_auth
            .get(role)
            .is_some_and(|actions| action.granted_by(actions));
        let topic = self
            .destination_auth
            .get(topic)
            .and_then(|roles| roles.get(role))
            .is_some_and(|actions| action.granted_by(actions));
        namespace || topic
    }

    /// True if `role` holds any grant in this namespace (namespace-wide or on one topic).
    pub fn has_any(&self, role: &str) -> bool {
        self.namespace_auth
            .get(role)
            .is_some_and(|actions| !actions.is_empty())
            || self
                .destination_auth
                .values()
                .any(|roles| roles.get(role).is_some_and(|actions| !actions.is_empty()))
    }
}

/// Checks actions given as a grant: known and not empty.
pub fn check_actions(actions: &[String]) -> Result<BTreeSet<String>, String> {
    if actions.is_empty() {
        return Err("no actions given (produce, consume)".into());
    }
    actions
        .iter()
        .map(|action| {
            if GRANTABLE.contains(&action.as_str()) {
                Ok(action.clone())
            } else {
                Err(format!(
                    "unknown action '{action}' (this broker grants produce and consume)"
                ))
            }
        })
        .collect()
}

/// Why `role` may not do `action` on `topic`, or None if it may.
pub fn topic_denial(
    role: &str,
    action: TopicAction,
    topic: &str,
    tenant_admins: &[String],
    grants: &AuthPolicies,
) -> Option<String> {
    if tenant_admins.iter().any(|admin| admin == role) || grants.allows(role, action, topic) {
        return None;
    }
    Some(format!(
        "role '{role}' has no {} permission on {topic}",
        action.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_on_the_namespace_or_the_topic_and_tenant_admins() {
        let mut grants = AuthPolicies::default();
        grants
            .namespace_auth
            .insert("reader".into(), ["consume".to_string()].into());
        grants.destination_auth.insert(
            "persistent://t/n/a".into(),
            [("writer".to_string(), ["produce".to_string()].into())].into(),
        );
        let admins = vec!["boss".to_string()];
        let topic = "persistent://t/n/a";
        assert!(topic_denial("reader", TopicAction::Consume, topic, &admins, &grants).is_none());
        assert!(topic_denial("reader", TopicAction::Produce, topic, &admins, &grants).is_some());
        assert!(topic_denial("writer", TopicAction::Produce, topic, &admins, &grants).is_none());
        assert!(topic_denial("writer", TopicAction::Lookup, topic, &admins, &grants).is_none());
        let other = "persistent://t/n/b";
        assert!(topic_denial("writer", TopicAction::Produce, other, &admins, &grants).is_some());
        assert!(topic_denial("boss", TopicAction::Produce, other, &admins, &grants).is_none());
        assert!(grants.has_any("writer") && !grants.has_any("nobody"));
        let json = grants.to_value();
        assert_eq!(AuthPolicies::from_policies(Some(&json)), grants);
        assert!(check_actions(&["produce".into(), "fly".into()]).is_err());
    }
}
