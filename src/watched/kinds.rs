//! The closed sets of a watch, as doppler.watched stores them (its CHECK constraints list the same
//! words): parsed once where they enter (`watch`'s arguments, a row of doppler.watched), matched
//! exhaustively where they are used. An unknown word is an error, never a default.

macro_rules! closed_set {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($(#[$vdoc:meta])* $variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in the order the error message lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word doppler.watched stores.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }

            /// The value of a word, if it is one.
            pub fn parse(word: &str) -> Option<$name> {
                match word {
                    $($word => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// The value of a word a user passed; 22023 naming the words allowed otherwise.
            pub fn from_arg(word: &str) -> $name {
                Self::parse(word).unwrap_or_else(|| {
                    let words: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    $crate::errors::raise(
                        $crate::errors::Code::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!(
                            "{} must be {}, not \"{word}\"",
                            $what,
                            $crate::watched::kinds::one_of(&words)
                        ),
                        "",
                    )
                })
            }
        }
    };
}
pub(crate) use closed_set;

/// `a, b or c`.
pub fn one_of(words: &[&str]) -> String {
    match words.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

closed_set!(
    /// When a watched table's rows get their features.
    Mode, "mode", {
    /// The worker, woken at commit.
    Async => "async",
    /// In the writing statement (the sync trigger).
    Sync => "sync",
    /// When someone calls `fill`, or the worker's periodic pass.
    Manual => "manual",
});

closed_set!(
    /// What the sync trigger does with an image that fails.
    OnError, "on_error", {
    /// The writing statement fails.
    Raise => "raise",
    /// The row is recorded in doppler.failures and left to the worker's retries.
    Defer => "defer",
});

closed_set!(
    /// What the source column holds.
    SourceKind, "source kind", {
    /// A server path or an http(s) URL (text, varchar).
    Path => "path",
    /// The image's bytes.
    Bytea => "bytea",
});

closed_set!(
    /// The vector column's type.
    VectorKind, "vector kind", {
    Real => "real[]",
    /// pgvector's vector(n).
    Vector => "vector",
    /// pgvector's halfvec(n).
    Halfvec => "halfvec",
});

closed_set!(
    /// Who may fill a watched table's rows in the background (`watch(..., workers => ...)`).
    Workers, "workers", {
    /// The server's own background worker only (the default).
    Server => "server",
    /// External `doppler-worker` processes only (members of doppler_worker); the server's
    /// worker leaves the table alone.
    External => "external",
    /// Both, at once.
    Any => "any",
});

impl Workers {
    /// Whether the server's background worker fills the table.
    pub fn server(self) -> bool {
        matches!(self, Workers::Server | Workers::Any)
    }

    /// Whether external workers may claim its rows.
    pub fn external(self) -> bool {
        matches!(self, Workers::External | Workers::Any)
    }
}
