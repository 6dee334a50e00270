//! The apps this agent serves: static ones from its config and dynamic ones
//! whose labels match its selectors. Unregistering an app ends its sessions.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use portico_core::labels::any_matches;
use portico_core::{App, LabelSelector};
use tokio::sync::watch;

/// What a change did to the served set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Registered,
    Updated,
    Unregistered,
    Ignored,
}

struct Entry {
    app: Arc<App>,
    dynamic: bool,
    /// Becomes `Some(reason)` when the app is unregistered; sessions watch it.
    end: watch::Sender<Option<String>>,
}

pub struct Registry {
    selectors: Vec<LabelSelector>,
    apps: RwLock<HashMap<String, Entry>>,
}

impl Registry {
    pub fn new(selectors: Vec<LabelSelector>, statics: Vec<App>) -> Self {
        let mut apps = HashMap::new();
        for app in statics {
            let (end, _) = watch::channel(None);
            apps.insert(
                app.metadata.name.clone(),
                Entry {
                    app: Arc::new(app),
                    dynamic: false,
                    end,
                },
            );
        }
        Registry {
            selectors,
            apps: RwLock::new(apps),
        }
    }

    pub fn matches(&self, app: &App) -> bool {
        any_matches(&self.selectors, &app.metadata.labels)
    }

    /// The app and a receiver that fires when it is unregistered.
    pub fn get(&self, name: &str) -> Option<(Arc<App>, watch::Receiver<Option<String>>)> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.get(name).map(|e| (e.app.clone(), e.end.subscribe()))
    }

    /// The app's JSON if it comes from the agent's config rather than the cluster.
    pub fn static_json(&self, name: &str) -> Option<String> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.get(name)
            .filter(|e| !e.dynamic)
            .map(|e| portico_core::Resource::App((*e.app).clone()).to_json())
    }

    pub fn names(&self) -> Vec<String> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = apps.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.apps.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A created or updated app from the watch.
    pub fn put(&self, app: App) -> Change {
        let name = app.metadata.name.clone();
        let matches = self.matches(&app);
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        match apps.get_mut(&name) {
            Some(e) if !e.dynamic => {
                tracing::warn!(app = %name, "a dynamic app has the name of a static app; keeping the static one");
                Change::Ignored
            }
            Some(e) if matches => {
                e.app = Arc::new(app);
                Change::Updated
            }
            Some(_) => {
                if let Some(e) = apps.remove(&name) {
                    let _ = e.end.send(Some(format!("the MCP server {name:?} was unregistered from this agent: its labels no longer match")));
                }
                Change::Unregistered
            }
            None if matches => {
                let (end, _) = watch::channel(None);
                apps.insert(
                    name,
                    Entry {
                        app: Arc::new(app),
                        dynamic: true,
                        end,
                    },
                );
                Change::Registered
            }
            None => Change::Ignored,
        }
    }

    /// A deleted app from the watch.
    pub fn delete(&self, name: &str) -> Change {
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        match apps.get(name) {
            Some(e) if e.dynamic => {
                if let Some(e) = apps.remove(name) {
                    let _ = e.end.send(Some(format!(
                        "the MCP server {name:?} was unregistered: it was deleted"
                    )));
                }
                Change::Unregistered
            }
            _ => Change::Ignored,
        }
    }

    /// Applies a full snapshot: returns (registered, unregistered) names.
    pub fn reconcile(&self, snapshot: Vec<App>) -> (Vec<String>, Vec<String>) {
        let names: std::collections::HashSet<String> =
            snapshot.iter().map(|a| a.metadata.name.clone()).collect();
        let mut registered = Vec::new();
        let mut unregistered = Vec::new();
        for app in snapshot {
            let name = app.metadata.name.clone();
            match self.put(app) {
                Change::Registered => registered.push(name),
                Change::Unregistered => unregistered.push(name),
                _ => {}
            }
        }
        let gone: Vec<String> = {
            let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
            apps.iter()
                .filter(|(n, e)| e.dynamic && !names.contains(*n))
                .map(|(n, _)| n.clone())
                .collect()
        };
        for n in gone {
            if self.delete(&n) == Change::Unregistered {
                unregistered.push(n);
            }
        }
        (registered, unregistered)
    }

    /// Ends every session (agent shutdown).
    pub fn close_all(&self, reason: &str) {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        for e in apps.values() {
            let _ = e.end.send(Some(reason.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_core::Resource;
    use portico_core::parse::parse_documents;
    use std::collections::BTreeMap;

    fn app(name: &str, env: &str) -> App {
        let y = format!(
            "kind: app\nversion: v3\nmetadata:\n  name: {name}\n  labels: {{env: {env}}}\nspec:\n  mcp: {{command: x, run_as_host_user: root}}\n"
        );
        match parse_documents("t", &y).expect("valid").remove(0) {
            Resource::App(a) => a,
            _ => panic!("not an app"),
        }
    }

    fn sel(env: &str) -> LabelSelector {
        LabelSelector::from_single(&BTreeMap::from([("env".to_string(), env.to_string())]))
            .expect("selector")
    }

    #[test]
    fn lifecycle() {
        let r = Registry::new(vec![sel("prod"), sel("test")], vec![]);
        assert_eq!(r.put(app("a", "dev")), Change::Ignored);
        assert_eq!(r.put(app("a", "prod")), Change::Registered);
        let (_, mut end) = r.get("a").expect("served");
        assert_eq!(r.put(app("a", "test")), Change::Updated);
        assert!(end.borrow_and_update().is_none());
        assert_eq!(r.put(app("a", "dev")), Change::Unregistered);
        assert!(
            end.borrow()
                .as_deref()
                .is_some_and(|s| s.contains("unregistered"))
        );
        assert!(r.get("a").is_none());
    }

    #[test]
    fn reconcile_registers_and_removes() {
        let r = Registry::new(vec![sel("*")], vec![]);
        r.put(app("old", "x"));
        let (reg, unreg) = r.reconcile(vec![app("new", "y")]);
        assert_eq!(reg, vec!["new".to_string()]);
        assert_eq!(unreg, vec!["old".to_string()]);
        let (reg, unreg) = r.reconcile(vec![app("new", "y")]);
        assert!(reg.is_empty() && unreg.is_empty(), "no double registration");
    }
}
