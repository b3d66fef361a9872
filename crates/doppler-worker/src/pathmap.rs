//! `--path-map FROM=TO`: where the worker finds the files the server names. A table stores the
//! server's paths (`/srv/images/a.jpg`); the worker's host may mount the same files elsewhere
//! (`/mnt/images/a.jpg`). A path starting with FROM is read at TO + the rest; the longest FROM
//! wins, and FROM only matches whole path components (`/srv/img` does not match `/srv/images`).

use std::borrow::Cow;

/// One `FROM=TO` rule, both absolute, without a trailing slash (except the root itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    from: String,
    to: String,
}

impl Rule {
    /// Parses `FROM=TO`.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let Some((from, to)) = s.split_once('=') else {
            return Err(format!("--path-map \"{s}\" is not FROM=TO"));
        };
        let clean = |p: &str, what: &str| -> Result<String, String> {
            if !p.starts_with('/') {
                return Err(format!(
                    "--path-map \"{s}\": {what} \"{p}\" is not an absolute path"
                ));
            }
            if p.split('/').any(|c| c == "..") {
                return Err(format!(
                    "--path-map \"{s}\": {what} \"{p}\" contains \"..\""
                ));
            }
            Ok(trim(p).to_string())
        };
        Ok(Rule {
            from: clean(from, "FROM")?,
            to: clean(to, "TO")?,
        })
    }

    /// The rest of `path` after FROM (empty or starting with `/`), when FROM is a whole-component
    /// prefix of it.
    fn rest<'p>(&self, path: &'p str) -> Option<&'p str> {
        if self.from == "/" {
            return path.starts_with('/').then_some(path);
        }
        let rest = path.strip_prefix(self.from.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }

    fn join(&self, rest: &str) -> String {
        match (self.to.as_str(), rest) {
            ("/", "") => "/".to_string(),
            ("/", rest) => rest.to_string(),
            (to, rest) => format!("{to}{rest}"),
        }
    }
}

/// `/a/b/` → `/a/b`, `/` stays.
fn trim(p: &str) -> &str {
    match p.trim_end_matches('/') {
        "" => "/",
        t => t,
    }
}

/// All the rules, longest FROM first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathMap {
    rules: Vec<Rule>,
}

impl PathMap {
    pub fn new(mut rules: Vec<Rule>) -> PathMap {
        // (stable: of two equal FROMs, the first given wins)
        rules.sort_by_key(|r| std::cmp::Reverse(r.from.len()));
        PathMap { rules }
    }

    /// The rules as `FROM=TO`, longest FROM first (for the log).
    pub fn describe(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(|r| format!("{}={}", r.from, r.to))
            .collect()
    }

    /// Where the worker reads the server path `path`: mapped by the longest matching FROM, or
    /// unchanged.
    pub fn map<'p>(&self, path: &'p str) -> Cow<'p, str> {
        self.rules
            .iter()
            .find_map(|r| r.rest(path).map(|rest| Cow::Owned(r.join(rest))))
            .unwrap_or(Cow::Borrowed(path))
    }

    /// The TO folders of the rules (where the server's paths are mounted here).
    pub fn targets(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.to.clone()).collect()
    }

    /// The server's `file_roots` as folders of this host: each root mapped, and the TO of every
    /// rule whose FROM lies inside a root (the part of that root mounted elsewhere). doppler-core
    /// checks the file actually opened (symlinks and `..` resolved) against these, so a mapped
    /// path cannot lead out of what the server allows. An empty list stays empty (anywhere).
    pub fn map_roots(&self, roots: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |p: String| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        for root in roots {
            if !root.starts_with('/') {
                // (not a server folder doppler-core could match: kept, it matches nothing)
                add(root.clone());
                continue;
            }
            let root = trim(root);
            add(self.map(root).into_owned());
            let inside = Rule {
                from: root.to_string(),
                to: root.to_string(),
            };
            for r in &self.rules {
                if inside.rest(&r.from).is_some() {
                    add(r.to.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rules: &[&str]) -> PathMap {
        PathMap::new(rules.iter().map(|r| Rule::parse(r).unwrap()).collect())
    }

    #[test]
    fn longest_from_wins_on_component_boundaries() {
        let m = map(&["/srv=/mnt/srv", "/srv/images/=/data/img", "/other=/"]);
        assert_eq!(m.map("/srv/images/a.jpg"), "/data/img/a.jpg");
        assert_eq!(m.map("/srv/images"), "/data/img");
        assert_eq!(m.map("/srv/imagesX/a.jpg"), "/mnt/srv/imagesX/a.jpg");
        assert_eq!(m.map("/srv/b.png"), "/mnt/srv/b.png");
        assert_eq!(m.map("/srvX/b.png"), "/srvX/b.png");
        assert_eq!(m.map("/other/x/y.png"), "/x/y.png");
        assert_eq!(m.map("/other"), "/");
        assert_eq!(m.map("relative/a.jpg"), "relative/a.jpg");
        assert_eq!(m.map("http://srv/a.jpg"), "http://srv/a.jpg");
    }

    #[test]
    fn root_rule_maps_everything_absolute() {
        let m = map(&["/=/host"]);
        assert_eq!(m.map("/a/b.jpg"), "/host/a/b.jpg");
        assert_eq!(m.map("a/b.jpg"), "a/b.jpg");
    }

    #[test]
    fn equal_froms_keep_the_first() {
        let m = map(&["/a=/one", "/a/=/two"]);
        assert_eq!(m.map("/a/x"), "/one/x");
        assert_eq!(m.describe(), ["/a=/one", "/a=/two"]);
        assert!(PathMap::default().describe().is_empty());
    }

    #[test]
    fn bad_rules() {
        for bad in ["/a", "a=/b", "/a=b", "=/b", "/a/../b=/c", "/a=/b/.."] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn roots_are_mapped() {
        let m = map(&["/srv/images=/mnt/img", "/data=/d"]);
        let roots = |r: &[&str]| m.map_roots(&r.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(roots(&[]).is_empty());
        assert_eq!(roots(&["/srv/images/public/"]), ["/mnt/img/public"]);
        assert_eq!(roots(&["/srv"]), ["/srv", "/mnt/img"]);
        assert_eq!(roots(&["/data", "/data/x"]), ["/d", "/d/x"]);
        assert_eq!(roots(&["/elsewhere"]), ["/elsewhere"]);
        assert_eq!(roots(&["/"]), ["/", "/mnt/img", "/d"]);
    }
}
