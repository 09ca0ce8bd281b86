//! A static reader of devenv.sh's `devenv.nix`.
//!
//! mvm does not run Nix: it reads the syntax tree of `devenv.nix` (parsed
//! with `rnix`) and takes only what is written as literals: the services
//! (`services.<name>.enable`, `port`, `listen_addresses`/`bind`/
//! `listenAddress`, `initialDatabases`, `initialScript`), `env.<NAME>`,
//! `packages` (as nixpkgs attribute names) and `processes.<name>.exec`.
//! Attribute paths may be nested in any shape (`a.b = 1;`,
//! `a = { b = 1; };`), the file may be a function (`{ pkgs, ... }: { ... }`)
//! and may start with `let ... in`.
//!
//! A value that needs evaluation (a variable, a function call, `if`,
//! `import`, `${...}` interpolation, arithmetic, ...) in one of those
//! attributes is never guessed: it is listed in [`Devenv::skipped`] with its
//! position and why. The module-system priority wrappers `lib.mkDefault X`,
//! `lib.mkForce X`, `lib.mkOverride N X` and `lib.mkOptionDefault X` (also
//! without `lib.`) are unwrapped to `X`: they only matter when other modules
//! (imports from `devenv.yaml`) define the same option, and mvm reads only
//! this file. Other top-level attributes (`languages`, `scripts`,
//! `enterShell`, ...) are listed by name in [`Devenv::other`].
//!
//! Hostile input: the file is parsed on a thread with a large stack, after
//! a check that bounds the parser's recursion, and the walk over the tree
//! has its own nesting limit; anything past the limits is a [`ParseError`].

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use microvm_dev::service::ServiceKind as GuestKind;
use rnix::ast::{self, HasEntry};
use rnix::{SyntaxKind, SyntaxNode};

/// Nesting levels (attribute sets, lists, parentheses, `++`, wrappers) the
/// walk over the tree follows before giving up with an error.
const MAX_DEPTH: u32 = 128;

/// The parser recurses without a limit on prefix `-` and `!`, on the
/// right-associative `++`, `//`, `->`, `<|`, on list items and on `or`
/// defaults; more of these tokens than this in one file is refused.
const MAX_UNBOUNDED_TOKENS: usize = 1024;

/// rnix's tokenizer looks ahead over a run of path characters
/// (`[A-Za-z0-9/_.+-]`) at each token, so a long run cut into many tokens
/// costs the square of its length; longer runs and larger files are
/// refused.
const MAX_RUN: usize = 256;
const MAX_FILE: usize = 256 << 10;

/// Stack of the parsing thread: rnix's own limit (512 expression levels)
/// plus [`MAX_UNBOUNDED_TOKENS`] levels need a few MiB in a debug build.
const PARSER_STACK: usize = 64 << 20;

/// What was read from a `devenv.nix`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Devenv {
    /// `services.<name>`, in the order of their first mention.
    pub services: Vec<DeclaredService>,
    /// `env.<NAME>` with literal string (or integer) values, in file order.
    pub env: Vec<(String, String)>,
    /// nixpkgs attribute names of `packages` (`pkgs.git` -> `git`,
    /// `pkgs.python3Packages.pip` -> `python3Packages.pip`).
    pub packages: Vec<String>,
    /// `processes.<name>.exec`, as (name, command).
    pub processes: Vec<(String, String)>,
    /// Values in the attributes above that cannot be read without Nix.
    pub skipped: Vec<Skipped>,
    /// Names of the other top-level attributes (`languages`, `scripts`,
    /// `enterShell`, ...), which mvm does not read.
    pub other: Vec<String>,
}

/// One `services.<name>` of a `devenv.nix`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeclaredService {
    /// The devenv service name (`postgres`, `redis`, ...).
    pub name: String,
    /// The service if mvm knows it; `None` for the others.
    pub kind: Option<ServiceKind>,
    /// True only when `enable` is the literal `true`.
    pub enabled: bool,
    pub port: Option<u16>,
    /// `listen_addresses` (postgres), `bind` (redis, memcached),
    /// `listenAddress` (rabbitmq, elasticsearch) or
    /// `settings.mysqld.bind-address` (mysql).
    pub listen_addresses: Option<String>,
    pub initial_databases: Vec<InitialDatabase>,
    pub initial_script: Option<String>,
    /// The service's other attributes, by name, which mvm does not read.
    pub ignored: Vec<String>,
}

/// One item of `services.<name>.initialDatabases`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InitialDatabase {
    pub name: String,
    pub user: Option<String>,
    pub pass: Option<String>,
}

/// A value that cannot be read without evaluating Nix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// The full dotted attribute path, e.g. `services.postgres.port`.
    pub attr: String,
    /// 1-based line and column (in characters) of the expression.
    pub line: u32,
    pub column: u32,
    pub reason: String,
}

/// A `devenv.nix` that does not parse, or that mvm cannot read at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line and column (in characters).
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

/// The devenv files of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevenvFiles {
    pub nix: PathBuf,
    pub yaml: Option<PathBuf>,
    pub lock: Option<PathBuf>,
}

/// The devenv files of `project`, if it has a `devenv.nix`.
pub fn detect(project: &Path) -> Option<DevenvFiles> {
    let nix = project.join("devenv.nix");
    if !nix.is_file() {
        return None;
    }
    let existing = |name: &str| Some(project.join(name)).filter(|p| p.is_file());
    Some(DevenvFiles {
        nix,
        yaml: existing("devenv.yaml"),
        lock: existing("devenv.lock"),
    })
}

/// Read and parse the `devenv.nix` at `path`.
pub fn read(path: &Path) -> crate::Result<Devenv> {
    let text = std::fs::read_to_string(path).map_err(crate::Error::io(format!("reading {}", path.display())))?;
    parse(&text).map_err(|e| crate::Error::Devenv {
        path: path.to_owned(),
        line: e.line,
        column: e.column,
        message: e.message,
    })
}

/// Parse the text of a `devenv.nix`.
pub fn parse(text: &str) -> Result<Devenv, ParseError> {
    let index = LineIndex::new(text);
    if text.len() > MAX_FILE {
        return Err(index.error(
            0,
            format!(
                "the file is larger than {} KiB; mvm does not read a devenv.nix this large",
                MAX_FILE >> 10
            ),
        ));
    }
    let mut run = 0;
    for (offset, c) in text.char_indices() {
        if c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '.' | '+' | '-') {
            run += 1;
            if run > MAX_RUN {
                return Err(index.error(
                    offset + 1 - run,
                    format!("a word longer than {MAX_RUN} characters; mvm does not read a devenv.nix with one"),
                ));
            }
        } else {
            run = 0;
        }
    }
    let unbounded = rnix::tokenize(text)
        .iter()
        .filter(|(kind, _)| {
            use SyntaxKind::*;
            matches!(
                kind,
                TOKEN_L_BRACK
                    | TOKEN_SUB
                    | TOKEN_INVERT
                    | TOKEN_CONCAT
                    | TOKEN_UPDATE
                    | TOKEN_IMPLICATION
                    | TOKEN_PIPE_LEFT
                    | TOKEN_OR
            )
        })
        .count();
    if unbounded > MAX_UNBOUNDED_TOKENS {
        return Err(index.error(
            0,
            format!("more than {MAX_UNBOUNDED_TOKENS} lists and operators; mvm does not read a devenv.nix this large"),
        ));
    }
    let owned = text.to_owned();
    let worker = std::thread::Builder::new()
        .name("devenv-parse".into())
        .stack_size(PARSER_STACK)
        .spawn(move || parse_on_this_thread(&owned));
    match worker {
        Ok(handle) => match handle.join() {
            Ok(result) => result,
            // A panic in the parser is a bug; report it as an unreadable
            // file rather than passing it on.
            Err(_) => Err(index.error(0, "internal error while parsing devenv.nix".into())),
        },
        Err(e) => Err(index.error(0, format!("cannot start the parser thread: {e}"))),
    }
}

fn parse_on_this_thread(text: &str) -> Result<Devenv, ParseError> {
    let index = LineIndex::new(text);
    let parsed = rnix::Root::parse(text);
    if let Some(e) = parsed.errors().first() {
        let (offset, message) = describe_parse_error(e, text);
        return Err(index.error(offset, message));
    }
    let root = parsed.syntax();
    // rnix reports every error it recovers from, but a stray error node
    // must not be read as an expression.
    if let Some(bad) = root
        .descendants_with_tokens()
        .find(|e| matches!(e.kind(), SyntaxKind::NODE_ERROR | SyntaxKind::TOKEN_ERROR))
    {
        return Err(index.error(bad.text_range().start().into(), "syntax error".into()));
    }
    let Some(expr) = root.children().find_map(ast::Expr::cast_node) else {
        return Err(index.error(
            0,
            "the file is empty; devenv.nix must be an attribute set `{ ... }`".into(),
        ));
    };
    let mut reader = Reader {
        index: &index,
        out: Devenv::default(),
        leaves: Vec::new(),
    };
    reader.read_top(expr)?;
    Ok(reader.out)
}

/// The services mvm knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ServiceKind {
    Postgres,
    Redis,
    /// devenv's `mysql`, which runs MariaDB by default.
    Mysql,
    Mongodb,
    Memcached,
    Rabbitmq,
    Elasticsearch,
    Opensearch,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 8] = [
        ServiceKind::Postgres,
        ServiceKind::Redis,
        ServiceKind::Mysql,
        ServiceKind::Mongodb,
        ServiceKind::Memcached,
        ServiceKind::Rabbitmq,
        ServiceKind::Elasticsearch,
        ServiceKind::Opensearch,
    ];

    /// The names of this service under devenv's `services.`.
    pub fn devenv_names(self) -> &'static [&'static str] {
        match self {
            ServiceKind::Postgres => &["postgres"],
            ServiceKind::Redis => &["redis"],
            ServiceKind::Mysql => &["mysql"],
            ServiceKind::Mongodb => &["mongodb"],
            ServiceKind::Memcached => &["memcached"],
            ServiceKind::Rabbitmq => &["rabbitmq"],
            ServiceKind::Elasticsearch => &["elasticsearch"],
            ServiceKind::Opensearch => &["opensearch"],
        }
    }

    pub fn from_devenv_name(name: &str) -> Option<ServiceKind> {
        ServiceKind::ALL.into_iter().find(|k| k.devenv_names().contains(&name))
    }

    /// The port the service listens on when devenv.nix sets none.
    pub fn default_port(self) -> u16 {
        match self {
            ServiceKind::Postgres => 5432,
            ServiceKind::Redis => 6379,
            ServiceKind::Mysql => 3306,
            ServiceKind::Mongodb => 27017,
            ServiceKind::Memcached => 11211,
            ServiceKind::Rabbitmq => 5672,
            ServiceKind::Elasticsearch | ServiceKind::Opensearch => 9200,
        }
    }

    /// The Debian 12 (bookworm) packages that run the service; empty when
    /// Debian has none (MongoDB, Elasticsearch, OpenSearch are not in
    /// Debian 12), so the service cannot run from Debian packages.
    pub fn debian_packages(self) -> &'static [&'static str] {
        match self {
            ServiceKind::Postgres => &["postgresql"],
            ServiceKind::Redis => &["redis-server"],
            ServiceKind::Mysql => &["mariadb-server"],
            ServiceKind::Memcached => &["memcached"],
            ServiceKind::Rabbitmq => &["rabbitmq-server"],
            ServiceKind::Mongodb | ServiceKind::Elasticsearch | ServiceKind::Opensearch => &[],
        }
    }

    /// The `kind` of a vm.toml `[[service]]` that the guest agent runs, for
    /// the services it can run.
    pub fn guest_kind(self) -> Option<GuestKind> {
        match self {
            ServiceKind::Postgres => Some(GuestKind::Postgresql),
            ServiceKind::Redis => Some(GuestKind::Redis),
            ServiceKind::Mysql => Some(GuestKind::Mariadb),
            _ => None,
        }
    }

    /// The devenv service a guest `[[service]]` kind stands for.
    pub fn from_guest(kind: GuestKind) -> ServiceKind {
        match kind {
            GuestKind::Postgresql => ServiceKind::Postgres,
            GuestKind::Redis => ServiceKind::Redis,
            GuestKind::Mariadb => ServiceKind::Mysql,
        }
    }

    /// The environment variables clients on the host use to reach the
    /// service at `host:port`. `database`, `user` and `password` go into
    /// the URLs percent-encoded; Redis ignores `user` and `database`.
    pub fn connection_env(
        self,
        host: &str,
        port: u16,
        database: Option<&str>,
        user: &str,
        password: Option<&str>,
    ) -> Vec<(String, String)> {
        let url_host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let userinfo = match password {
            Some(p) => format!("{}:{}@", percent_encode(user), percent_encode(p)),
            None => format!("{}@", percent_encode(user)),
        };
        let path = database.map(|d| format!("/{}", percent_encode(d))).unwrap_or_default();
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| env.push((k.to_owned(), v));
        match self {
            ServiceKind::Postgres => {
                set("DATABASE_URL", format!("postgres://{userinfo}{url_host}:{port}{path}"));
                set("PGHOST", host.to_owned());
                set("PGPORT", port.to_string());
                set("PGUSER", user.to_owned());
                if let Some(d) = database {
                    set("PGDATABASE", d.to_owned());
                }
                if let Some(p) = password {
                    set("PGPASSWORD", p.to_owned());
                }
            }
            ServiceKind::Mysql => {
                set("DATABASE_URL", format!("mysql://{userinfo}{url_host}:{port}{path}"));
                set("MYSQL_HOST", host.to_owned());
                set("MYSQL_TCP_PORT", port.to_string());
                set("MYSQL_USER", user.to_owned());
                if let Some(d) = database {
                    set("MYSQL_DATABASE", d.to_owned());
                }
                if let Some(p) = password {
                    set("MYSQL_PWD", p.to_owned());
                }
            }
            ServiceKind::Redis => {
                let auth = password.map(|p| format!(":{}@", percent_encode(p))).unwrap_or_default();
                set("REDIS_URL", format!("redis://{auth}{url_host}:{port}"));
                set("REDIS_HOST", host.to_owned());
                set("REDIS_PORT", port.to_string());
            }
            ServiceKind::Mongodb => {
                let auth = if password.is_some() { userinfo } else { String::new() };
                set("MONGODB_URI", format!("mongodb://{auth}{url_host}:{port}{path}"));
            }
            ServiceKind::Memcached => {
                set("MEMCACHED_HOST", host.to_owned());
                set("MEMCACHED_PORT", port.to_string());
            }
            ServiceKind::Rabbitmq => {
                set("AMQP_URL", format!("amqp://{userinfo}{url_host}:{port}"));
                set("RABBITMQ_HOST", host.to_owned());
                set("RABBITMQ_PORT", port.to_string());
            }
            ServiceKind::Elasticsearch | ServiceKind::Opensearch => {
                let name = if self == ServiceKind::Elasticsearch {
                    "ELASTICSEARCH_URL"
                } else {
                    "OPENSEARCH_URL"
                };
                set(name, format!("http://{url_host}:{port}"));
            }
        }
        env
    }
}

/// Percent-encode everything but RFC 3986's unreserved characters, so the
/// text is safe in a URL's user, password and path.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Byte offsets to 1-based lines and columns.
struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { text, starts }
    }

    fn position(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts.get(line - 1).copied().unwrap_or(0);
        let column = self.text.get(start..offset).map_or(0, |s| s.chars().count()) + 1;
        (
            u32::try_from(line).unwrap_or(u32::MAX),
            u32::try_from(column).unwrap_or(u32::MAX),
        )
    }

    fn error(&self, offset: usize, message: String) -> ParseError {
        let (line, column) = self.position(offset);
        ParseError { line, column, message }
    }
}

fn describe_parse_error(e: &rnix::parser::ParseError, text: &str) -> (usize, String) {
    use rnix::parser::ParseError as E;
    let snippet = |range: rnix::TextRange| {
        let s = text.get(range.start().into()..range.end().into()).unwrap_or("");
        let first = s.split_whitespace().next().unwrap_or(s);
        let short: String = first.chars().take(20).collect();
        format!("`{short}`")
    };
    let wanted = |kinds: &[SyntaxKind]| kinds.iter().map(|k| kind_name(*k)).collect::<Vec<_>>().join(" or ");
    let end = text.len();
    match e {
        E::Unexpected(r) => (r.start().into(), format!("unexpected {}", snippet(*r))),
        E::UnexpectedExtra(r) => (
            r.start().into(),
            format!("unexpected {} after the end of the expression", snippet(*r)),
        ),
        E::UnexpectedWanted(_, r, kinds) => (
            r.start().into(),
            format!("unexpected {}, expected {}", snippet(*r), wanted(kinds)),
        ),
        E::UnexpectedDoubleBind(r) => (r.start().into(), "a function pattern is bound twice with `@`".into()),
        E::UnexpectedEOF => (end, "unexpected end of file".into()),
        E::UnexpectedEOFWanted(kinds) => (end, format!("unexpected end of file, expected {}", wanted(kinds))),
        E::DuplicatedArgs(r, name) => (r.start().into(), format!("function argument `{name}` is duplicated")),
        E::RecursionLimitExceeded => (0, "expressions nested too deeply".into()),
        other => (0, other.to_string()),
    }
}

fn kind_name(kind: SyntaxKind) -> String {
    use SyntaxKind::*;
    let s = match kind {
        TOKEN_ASSERT => "`assert`",
        TOKEN_ELSE => "`else`",
        TOKEN_IF => "`if`",
        TOKEN_IN => "`in`",
        TOKEN_INHERIT => "`inherit`",
        TOKEN_LET => "`let`",
        TOKEN_OR => "`or`",
        TOKEN_REC => "`rec`",
        TOKEN_THEN => "`then`",
        TOKEN_WITH => "`with`",
        TOKEN_L_BRACE => "`{`",
        TOKEN_R_BRACE => "`}`",
        TOKEN_L_BRACK => "`[`",
        TOKEN_R_BRACK => "`]`",
        TOKEN_ASSIGN => "`=`",
        TOKEN_AT => "`@`",
        TOKEN_COLON => "`:`",
        TOKEN_COMMA => "`,`",
        TOKEN_DOT => "`.`",
        TOKEN_ELLIPSIS => "`...`",
        TOKEN_QUESTION => "`?`",
        TOKEN_SEMICOLON => "`;`",
        TOKEN_L_PAREN => "`(`",
        TOKEN_R_PAREN => "`)`",
        TOKEN_IDENT => "a name",
        TOKEN_INTERPOL_START => "`${`",
        TOKEN_INTERPOL_END => "`}`",
        TOKEN_STRING_START => "a string",
        TOKEN_STRING_END => "the end of the string",
        TOKEN_STRING_CONTENT => "string text",
        other => return format!("{other:?}").trim_start_matches("TOKEN_").to_lowercase(),
    };
    s.to_owned()
}

/// `cast` and `syntax` of rnix's AST types without depending on rowan's
/// trait directly.
trait NodeExt: Sized {
    fn cast_node(node: SyntaxNode) -> Option<Self>;
    fn node(&self) -> &SyntaxNode;
}

impl<N: rnix::ast::AstNode> NodeExt for N {
    fn cast_node(node: SyntaxNode) -> Option<Self> {
        N::cast(node)
    }
    fn node(&self) -> &SyntaxNode {
        self.syntax()
    }
}

fn start(node: &impl NodeExt) -> usize {
    node.node().text_range().start().into()
}

/// Names that are bound in Nix's base environment and so shadow `with`.
const BUILTIN_NAMES: &[&str] = &[
    "true",
    "false",
    "null",
    "builtins",
    "import",
    "derivation",
    "toString",
    "map",
    "throw",
    "abort",
    "baseNameOf",
    "dirOf",
    "removeAttrs",
    "isNull",
    "fetchTarball",
    "fetchGit",
    "fetchurl",
    "placeholder",
    "scopedImport",
];

/// The lexical scope of a value: names bound by function arguments, `let`
/// and `rec`, and `with` namespaces, innermost first.
enum Frame {
    Names(HashSet<String>),
    /// `with pkgs;` or `with pkgs.a.b;`: the attribute path prefix; `None`
    /// for a `with` of anything else.
    With(Option<Vec<String>>),
}

struct Scope {
    frame: Frame,
    parent: Option<Rc<Scope>>,
}

type ScopeRef = Option<Rc<Scope>>;

fn push_frame(parent: &ScopeRef, frame: Frame) -> ScopeRef {
    Some(Rc::new(Scope {
        frame,
        parent: parent.clone(),
    }))
}

/// How a bare name resolves.
enum Resolved {
    /// An argument, `let`, `rec` or builtin binding.
    Lexical,
    /// An attribute of `pkgs` under this prefix.
    Pkgs(Vec<String>),
    /// An attribute of a `with` namespace that is not `pkgs`.
    OtherWith,
    Undefined,
}

fn resolve(scope: &ScopeRef, name: &str) -> Resolved {
    if BUILTIN_NAMES.contains(&name) {
        return Resolved::Lexical;
    }
    // Lexical bindings win over every `with`, however nested.
    let mut innermost_with = None;
    let mut cursor = scope.as_deref();
    while let Some(s) = cursor {
        match &s.frame {
            Frame::Names(names) if names.contains(name) => return Resolved::Lexical,
            Frame::With(ns) if innermost_with.is_none() => innermost_with = Some(ns),
            _ => {}
        }
        cursor = s.parent.as_deref();
    }
    match innermost_with {
        Some(Some(prefix)) => Resolved::Pkgs(prefix.clone()),
        Some(None) => Resolved::OtherWith,
        None => Resolved::Undefined,
    }
}

/// A definition in the top-level attribute set: the attribute path and the
/// value, which is never an attribute set literal (those are flattened).
struct Leaf {
    path: Vec<String>,
    /// The path has a computed `${...}` name.
    dynamic: bool,
    value: LeafValue,
    offset: usize,
    scope: ScopeRef,
}

enum LeafValue {
    Expr(ast::Expr),
    /// `inherit name;` or `inherit (from) name;`.
    Inherit,
    /// `{ }`: records that the path exists.
    EmptySet,
}

/// Why a value was not read: where and why.
struct Skip {
    offset: usize,
    reason: String,
}

fn skip(node: &impl NodeExt, reason: impl Into<String>) -> Skip {
    Skip {
        offset: start(node),
        reason: reason.into(),
    }
}

struct Reader<'a> {
    index: &'a LineIndex<'a>,
    out: Devenv,
    leaves: Vec<Leaf>,
}

const DYNAMIC: &str = "${...}";

impl Reader<'_> {
    fn too_deep(&self, offset: usize) -> ParseError {
        self.index.error(
            offset,
            format!("nested more than {MAX_DEPTH} levels deep; mvm does not read a devenv.nix this complex"),
        )
    }

    fn read_top(&mut self, expr: ast::Expr) -> Result<(), ParseError> {
        let mut scope: ScopeRef = None;
        let mut expr = expr;
        let mut depth = 0;
        // Peel `args: let ... in with ...; { ... }`.
        let set = loop {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(self.too_deep(start(&expr)));
            }
            match expr {
                ast::Expr::Lambda(lambda) => {
                    scope = push_frame(&scope, Frame::Names(lambda_names(&lambda)));
                    match lambda.body() {
                        Some(body) => expr = body,
                        None => return Err(self.not_a_set(start(&lambda))),
                    }
                }
                ast::Expr::LetIn(let_in) => {
                    scope = push_frame(&scope, Frame::Names(binding_names(&let_in)));
                    match let_in.body() {
                        Some(body) => expr = body,
                        None => return Err(self.not_a_set(start(&let_in))),
                    }
                }
                ast::Expr::With(with) => {
                    let ns = with.namespace().and_then(|ns| with_namespace(&ns));
                    scope = push_frame(&scope, Frame::With(ns));
                    match with.body() {
                        Some(body) => expr = body,
                        None => return Err(self.not_a_set(start(&with))),
                    }
                }
                ast::Expr::Paren(paren) => match paren.expr() {
                    Some(inner) => expr = inner,
                    None => return Err(self.not_a_set(start(&paren))),
                },
                ast::Expr::AttrSet(set) => break set,
                other => return Err(self.not_a_set(start(&other))),
            }
        };
        self.flatten(&set, &[], false, &scope, 0)?;
        self.check_duplicates()?;
        let leaves = std::mem::take(&mut self.leaves);
        for leaf in &leaves {
            self.classify(leaf)?;
        }
        Ok(())
    }

    fn not_a_set(&self, offset: usize) -> ParseError {
        self.index.error(
            offset,
            "devenv.nix must be an attribute set `{ ... }` or a function returning one (`{ pkgs, ... }: { ... }`); \
             mvm reads it without evaluating Nix"
                .into(),
        )
    }

    /// Record the definitions of `set` (under `prefix`) as leaves.
    fn flatten(
        &mut self,
        set: &ast::AttrSet,
        prefix: &[String],
        dynamic: bool,
        scope: &ScopeRef,
        depth: u32,
    ) -> Result<(), ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.too_deep(start(set)));
        }
        let scope = if set.rec_token().is_some() {
            push_frame(scope, Frame::Names(binding_names(set)))
        } else {
            scope.clone()
        };
        let mut any = false;
        for entry in set.entries() {
            any = true;
            match entry {
                ast::Entry::AttrpathValue(apv) => {
                    let mut path = prefix.to_vec();
                    let mut dynamic = dynamic;
                    if let Some(attrpath) = apv.attrpath() {
                        for attr in attrpath.attrs() {
                            match attr_name(&attr) {
                                Some(name) => path.push(name),
                                None => {
                                    path.push(DYNAMIC.into());
                                    dynamic = true;
                                }
                            }
                        }
                    }
                    let Some(value) = apv.value() else { continue };
                    let value = unwrap_priority(value, depth).ok_or_else(|| self.too_deep(start(&apv)))?;
                    match value {
                        ast::Expr::AttrSet(inner) => self.flatten(&inner, &path, dynamic, &scope, depth + 1)?,
                        value => self.leaves.push(Leaf {
                            path,
                            dynamic,
                            offset: start(&value),
                            value: LeafValue::Expr(value),
                            scope: scope.clone(),
                        }),
                    }
                }
                ast::Entry::Inherit(inherit) => {
                    for attr in inherit.attrs() {
                        let mut path = prefix.to_vec();
                        let name = attr_name(&attr);
                        path.push(name.clone().unwrap_or_else(|| DYNAMIC.into()));
                        self.leaves.push(Leaf {
                            path,
                            dynamic: dynamic || name.is_none(),
                            value: LeafValue::Inherit,
                            offset: start(&attr),
                            scope: scope.clone(),
                        });
                    }
                }
            }
        }
        if !any && !prefix.is_empty() {
            self.leaves.push(Leaf {
                path: prefix.to_vec(),
                dynamic,
                value: LeafValue::EmptySet,
                offset: start(set),
                scope,
            });
        }
        Ok(())
    }

    /// Nix refuses a set that defines an attribute twice, or defines
    /// attributes under a value that is not a set literal; so does mvm,
    /// rather than pick one.
    fn check_duplicates(&self) -> Result<(), ParseError> {
        let mut order: Vec<&Leaf> = self.leaves.iter().filter(|l| !l.dynamic).collect();
        order.sort_by(|a, b| a.path.cmp(&b.path).then(a.offset.cmp(&b.offset)));
        let mut worst: Option<(&Leaf, &Leaf)> = None;
        for pair in order.windows(2) {
            let [a, b] = pair else { continue };
            // Nix merges set literals, and `{ }` is one.
            let set_literal = |l: &Leaf| matches!(l.value, LeafValue::EmptySet);
            if b.path.starts_with(&a.path) && !set_literal(a) && !set_literal(b) {
                let (first, second) = if a.offset <= b.offset { (a, b) } else { (b, a) };
                if worst.is_none_or(|(_, w)| second.offset < w.offset) {
                    worst = Some((first, second));
                }
            }
        }
        match worst {
            None => Ok(()),
            Some((first, second)) => {
                let (line, column) = self.index.position(first.offset);
                Err(self.index.error(
                    second.offset,
                    format!(
                        "attribute `{}` already defined at line {line}, column {column}",
                        first.path.join(".")
                    ),
                ))
            }
        }
    }

    fn skipped(&mut self, attr: String, skip: Skip) {
        let (line, column) = self.index.position(skip.offset);
        self.out.skipped.push(Skipped {
            attr,
            line,
            column,
            reason: skip.reason,
        });
    }

    fn leaf_expr(&self, leaf: &Leaf) -> Result<ast::Expr, Skip> {
        match &leaf.value {
            LeafValue::Expr(e) => Ok(e.clone()),
            LeafValue::Inherit => Err(Skip {
                offset: leaf.offset,
                reason: "`inherit` takes the value of a variable, which mvm does not evaluate".into(),
            }),
            LeafValue::EmptySet => Err(Skip {
                offset: leaf.offset,
                reason: "an attribute set, not a value".into(),
            }),
        }
    }

    fn classify(&mut self, leaf: &Leaf) -> Result<(), ParseError> {
        let Some(top) = leaf.path.first() else { return Ok(()) };
        let attr = leaf.path.join(".");
        if top == DYNAMIC {
            let skip = Skip {
                offset: leaf.offset,
                reason: "the attribute name is computed with `${...}`".into(),
            };
            self.skipped(attr, skip);
            return Ok(());
        }
        match top.as_str() {
            "services" => self.service_leaf(leaf, attr),
            "env" => {
                match leaf.path.get(1..) {
                    Some([_]) if !leaf.dynamic => match self.leaf_expr(leaf).and_then(env_value) {
                        Ok(value) => self.out.env.push((leaf.path[1].clone(), value)),
                        Err(skip) => self.skipped(attr, skip),
                    },
                    Some([]) if matches!(leaf.value, LeafValue::EmptySet) => {}
                    _ => {
                        let skip = match self.leaf_expr(leaf) {
                            Err(skip) => skip,
                            Ok(e) if leaf.dynamic => skip(&e, "the variable name is computed with `${...}`"),
                            Ok(e) if leaf.path.len() == 1 => skip(&e, why("an attribute set of variables", &e)),
                            Ok(e) => skip(&e, "an environment variable must be a string, not an attribute set"),
                        };
                        self.skipped(attr, skip);
                    }
                }
                Ok(())
            }
            "packages" => {
                match self.leaf_expr(leaf) {
                    Ok(e) if leaf.path.len() == 1 => {
                        let mut skips = Vec::new();
                        let mut names = Vec::new();
                        packages(e, &leaf.scope, 0, &mut names, &mut skips).map_err(|o| self.too_deep(o))?;
                        self.out.packages.extend(names);
                        for s in skips {
                            self.skipped(attr.clone(), s);
                        }
                    }
                    Ok(e) => self.skipped(attr, skip(&e, "`packages` must be a list")),
                    Err(s) => self.skipped(attr, s),
                }
                Ok(())
            }
            "processes" => {
                match leaf.path.get(1..) {
                    Some([name, field]) if field == "exec" && !leaf.dynamic => {
                        match self.leaf_expr(leaf).and_then(|e| string_value(&e)) {
                            Ok(exec) => self.out.processes.push((name.clone(), exec)),
                            Err(s) => self.skipped(attr, s),
                        }
                    }
                    Some([_, _, ..]) if !leaf.dynamic => {} // process-compose settings and the like
                    Some([_]) | Some([]) if matches!(leaf.value, LeafValue::EmptySet) => {}
                    _ => {
                        let s = match self.leaf_expr(leaf) {
                            Err(s) => s,
                            Ok(e) if leaf.dynamic => skip(&e, "the process name is computed with `${...}`"),
                            Ok(e) => skip(&e, why("an attribute set with `exec`", &e)),
                        };
                        self.skipped(attr, s);
                    }
                }
                Ok(())
            }
            other => {
                if !self.out.other.iter().any(|o| o == other) {
                    self.out.other.push(other.to_owned());
                }
                Ok(())
            }
        }
    }

    fn service<'s>(out: &'s mut Devenv, name: &str) -> &'s mut DeclaredService {
        let i = match out.services.iter().position(|s| s.name == name) {
            Some(i) => i,
            None => {
                out.services.push(DeclaredService {
                    name: name.to_owned(),
                    kind: ServiceKind::from_devenv_name(name),
                    enabled: false,
                    port: None,
                    listen_addresses: None,
                    initial_databases: Vec::new(),
                    initial_script: None,
                    ignored: Vec::new(),
                });
                out.services.len() - 1
            }
        };
        &mut out.services[i]
    }

    fn service_leaf(&mut self, leaf: &Leaf, attr: String) -> Result<(), ParseError> {
        let path = &leaf.path;
        let Some(name) = path.get(1) else {
            if !matches!(leaf.value, LeafValue::EmptySet) {
                let s = match self.leaf_expr(leaf) {
                    Err(s) => s,
                    Ok(e) => skip(&e, why("an attribute set of services", &e)),
                };
                self.skipped(attr, s);
            }
            return Ok(());
        };
        if name == DYNAMIC {
            let s = Skip {
                offset: leaf.offset,
                reason: "the service name is computed with `${...}`".into(),
            };
            self.skipped(attr, s);
            return Ok(());
        }
        Self::service(&mut self.out, name);
        let Some(field) = path.get(2) else {
            if !matches!(leaf.value, LeafValue::EmptySet) {
                let s = match self.leaf_expr(leaf) {
                    Err(s) => s,
                    Ok(e) => skip(&e, why("an attribute set", &e)),
                };
                self.skipped(attr, s);
            }
            return Ok(());
        };
        let rest = path.get(3..).unwrap_or(&[]);
        let mysql_setting = |key: &str| field == "settings" && rest.len() == 2 && rest[0] == "mysqld" && rest[1] == key;
        enum Field {
            Enable,
            Port,
            Listen,
            Databases,
            Script,
        }
        let known = match field.as_str() {
            "enable" => Some(Field::Enable),
            "port" => Some(Field::Port),
            "listen_addresses" | "bind" | "listenAddress" => Some(Field::Listen),
            "initialDatabases" => Some(Field::Databases),
            "initialScript" => Some(Field::Script),
            _ if mysql_setting("port") => Some(Field::Port),
            _ if mysql_setting("bind-address") => Some(Field::Listen),
            _ => None,
        };
        let Some(known) = known else {
            let service = Self::service(&mut self.out, name);
            if !service.ignored.contains(field) {
                service.ignored.push(field.clone());
            }
            return Ok(());
        };
        if leaf.dynamic || (field != "settings" && !rest.is_empty()) {
            let s = match self.leaf_expr(leaf) {
                Ok(e) if leaf.dynamic => skip(&e, "the attribute name is computed with `${...}`"),
                Ok(e) => skip(&e, format!("`{field}` must be a value, not an attribute set")),
                Err(s) => s,
            };
            self.skipped(attr, s);
            return Ok(());
        }
        let expr = match self.leaf_expr(leaf) {
            Ok(e) => e,
            Err(s) => {
                self.skipped(attr, s);
                return Ok(());
            }
        };
        match known {
            Field::Enable => match bool_value(&expr) {
                Ok(b) => Self::service(&mut self.out, name).enabled = b,
                Err(s) => self.skipped(attr, s),
            },
            Field::Port => match port_value(&expr) {
                Ok(p) => Self::service(&mut self.out, name).port = Some(p),
                Err(s) => self.skipped(attr, s),
            },
            Field::Listen => match string_value(&expr) {
                Ok(v) => Self::service(&mut self.out, name).listen_addresses = Some(v),
                Err(s) => self.skipped(attr, s),
            },
            Field::Script => match string_value(&expr) {
                Ok(v) => Self::service(&mut self.out, name).initial_script = Some(v),
                Err(s) => self.skipped(attr, s),
            },
            Field::Databases => {
                let (dbs, ignored, skips) = initial_databases(&expr);
                let service = Self::service(&mut self.out, name);
                service.initial_databases.extend(dbs);
                for i in ignored {
                    if !service.ignored.contains(&i) {
                        service.ignored.push(i);
                    }
                }
                for s in skips {
                    self.skipped(attr.clone(), s);
                }
            }
        }
        Ok(())
    }
}

/// Names bound by a function's arguments.
fn lambda_names(lambda: &ast::Lambda) -> HashSet<String> {
    let mut names = HashSet::new();
    match lambda.param() {
        Some(ast::Param::IdentParam(p)) => names.extend(p.ident().map(|i| i.to_string())),
        Some(ast::Param::Pattern(p)) => {
            names.extend(p.pat_entries().filter_map(|e| e.ident()).map(|i| i.to_string()));
            names.extend(p.pat_bind().and_then(|b| b.ident()).map(|i| i.to_string()));
        }
        None => {}
    }
    names
}

/// Names bound by a `let` or `rec` set: the first attribute of each
/// definition and the inherited names.
fn binding_names(set: &impl HasEntry) -> HashSet<String> {
    let mut names = HashSet::new();
    for apv in set.attrpath_values() {
        if let Some(name) = apv
            .attrpath()
            .and_then(|p| p.attrs().next())
            .and_then(|a| attr_name(&a))
        {
            names.insert(name);
        }
    }
    for inherit in set.inherits() {
        names.extend(inherit.attrs().filter_map(|a| attr_name(&a)));
    }
    names
}

/// The static name of an attribute: `name`, `"name"` or `${"name"}`.
fn attr_name(attr: &ast::Attr) -> Option<String> {
    match attr {
        ast::Attr::Ident(i) => Some(i.to_string()),
        ast::Attr::Str(s) => string_literal(s).ok(),
        ast::Attr::Dynamic(d) => match d.expr() {
            Some(ast::Expr::Str(s)) => string_literal(&s).ok(),
            _ => None,
        },
    }
}

/// The attribute path prefix of `with pkgs;` or `with pkgs.a.b;`.
fn with_namespace(ns: &ast::Expr) -> Option<Vec<String>> {
    match ns {
        ast::Expr::Ident(i) if i.to_string() == "pkgs" => Some(Vec::new()),
        ast::Expr::Select(sel) if sel.or_token().is_none() => match sel.expr() {
            Some(ast::Expr::Ident(i)) if i.to_string() == "pkgs" => sel
                .attrpath()
                .map(|p| p.attrs().map(|a| attr_name(&a)).collect::<Option<Vec<_>>>())
                .unwrap_or(None),
            _ => None,
        },
        ast::Expr::Paren(p) => p.expr().and_then(|e| with_namespace(&e)),
        _ => None,
    }
}

/// Strip parentheses and the priority wrappers `lib.mkDefault X`,
/// `lib.mkForce X`, `lib.mkOptionDefault X`, `lib.mkOverride N X` (also
/// bare or as `pkgs.lib.*`). `None` past the nesting limit.
fn unwrap_priority(mut expr: ast::Expr, depth: u32) -> Option<ast::Expr> {
    let mut depth = depth;
    loop {
        depth += 1;
        if depth > MAX_DEPTH {
            return None;
        }
        expr = match expr {
            ast::Expr::Paren(ref p) => match p.expr() {
                Some(inner) => inner,
                None => return Some(expr),
            },
            ast::Expr::Apply(ref apply) => {
                let (Some(function), Some(argument)) = (apply.lambda(), apply.argument()) else {
                    return Some(expr);
                };
                match wrapper_name(&function).as_deref() {
                    Some("mkDefault" | "mkForce" | "mkOptionDefault") => argument,
                    _ => match function {
                        // `mkOverride N` applied to X.
                        ast::Expr::Apply(inner)
                            if inner.lambda().and_then(|f| wrapper_name(&f)).as_deref() == Some("mkOverride") =>
                        {
                            argument
                        }
                        _ => return Some(expr),
                    },
                }
            }
            other => return Some(other),
        };
    }
}

/// `mkX` for `mkX`, `lib.mkX` and `pkgs.lib.mkX`.
fn wrapper_name(function: &ast::Expr) -> Option<String> {
    let name = match function {
        ast::Expr::Ident(i) => i.to_string(),
        ast::Expr::Select(sel) if sel.or_token().is_none() => {
            let path: Vec<String> = sel.attrpath()?.attrs().map(|a| attr_name(&a)).collect::<Option<_>>()?;
            let base = match sel.expr()? {
                ast::Expr::Ident(i) => i.to_string(),
                _ => return None,
            };
            match (base.as_str(), path.as_slice()) {
                ("lib", [name]) => name.clone(),
                ("pkgs", [lib, name]) if lib == "lib" => name.clone(),
                _ => return None,
            }
        }
        _ => return None,
    };
    matches!(
        name.as_str(),
        "mkDefault" | "mkForce" | "mkOptionDefault" | "mkOverride"
    )
    .then_some(name)
}

/// Why `expr` cannot be used where `expected` is needed: a literal of
/// the wrong type, or an expression that needs evaluation.
fn why(expected: &str, expr: &ast::Expr) -> String {
    let literal = |kind: &str| format!("expected {expected}, found {kind}");
    let dynamic = |kind: &str| format!("{kind} cannot be read without evaluating Nix");
    match expr {
        ast::Expr::Ident(i) => dynamic(&format!("the variable `{i}`")),
        ast::Expr::Apply(_) => dynamic("a function call"),
        ast::Expr::Select(_) => dynamic("an attribute of a variable"),
        ast::Expr::IfElse(_) => dynamic("an `if`"),
        ast::Expr::LetIn(_) | ast::Expr::LegacyLet(_) => dynamic("a `let`"),
        ast::Expr::With(_) => dynamic("a `with`"),
        ast::Expr::Assert(_) => dynamic("an `assert`"),
        ast::Expr::BinOp(_) | ast::Expr::UnaryOp(_) | ast::Expr::HasAttr(_) => dynamic("an operator expression"),
        ast::Expr::Lambda(_) => literal("a function"),
        ast::Expr::List(_) => literal("a list"),
        ast::Expr::Str(_) => literal("a string"),
        ast::Expr::Path(_) => literal("a path"),
        ast::Expr::Literal(_) => literal("a number"),
        ast::Expr::AttrSet(_) => literal("an attribute set"),
        _ => dynamic("this expression"),
    }
}

fn bool_value(expr: &ast::Expr) -> Result<bool, Skip> {
    let expr = unwrap_priority(expr.clone(), 0).unwrap_or_else(|| expr.clone());
    match &expr {
        ast::Expr::Ident(i) if i.to_string() == "true" => Ok(true),
        ast::Expr::Ident(i) if i.to_string() == "false" => Ok(false),
        other => Err(skip(other, why("`true` or `false`", other))),
    }
}

/// A literal integer, possibly negated.
fn integer_value(expr: &ast::Expr) -> Option<Result<i64, ()>> {
    match expr {
        ast::Expr::Literal(lit) => {
            let token = lit.node().first_token()?;
            (token.kind() == SyntaxKind::TOKEN_INTEGER).then(|| token.text().parse::<i64>().map_err(|_| ()))
        }
        ast::Expr::UnaryOp(op) if op.operator() == Some(ast::UnaryOpKind::Negate) => match op.expr()? {
            ast::Expr::Literal(lit) => {
                let token = lit.node().first_token()?;
                (token.kind() == SyntaxKind::TOKEN_INTEGER)
                    .then(|| token.text().parse::<i64>().map(|v| -v).map_err(|_| ()))
            }
            _ => None,
        },
        _ => None,
    }
}

fn port_value(expr: &ast::Expr) -> Result<u16, Skip> {
    let expr = unwrap_priority(expr.clone(), 0).unwrap_or_else(|| expr.clone());
    match integer_value(&expr) {
        Some(Ok(v)) => match u16::try_from(v) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(skip(&expr, format!("port {v} is not in 1-65535"))),
        },
        Some(Err(())) => Err(skip(&expr, "the port is too large an integer")),
        None => Err(skip(&expr, why("an integer", &expr))),
    }
}

fn string_value(expr: &ast::Expr) -> Result<String, Skip> {
    let expr = unwrap_priority(expr.clone(), 0).unwrap_or_else(|| expr.clone());
    match &expr {
        ast::Expr::Str(s) => string_literal(s),
        other => Err(skip(other, why("a string", other))),
    }
}

fn env_value(expr: ast::Expr) -> Result<String, Skip> {
    let expr = unwrap_priority(expr.clone(), 0).unwrap_or(expr);
    match integer_value(&expr) {
        // devenv exports numbers as their decimal text.
        Some(Ok(v)) => Ok(v.to_string()),
        _ => match &expr {
            ast::Expr::Str(s) => string_literal(s),
            other => Err(skip(other, why("a string", other))),
        },
    }
}

/// The items of an `initialDatabases` list: the databases, the item
/// attributes mvm does not read (as `initialDatabases.<attr>`), and the
/// items that cannot be read.
fn initial_databases(expr: &ast::Expr) -> (Vec<InitialDatabase>, Vec<String>, Vec<Skip>) {
    let mut dbs = Vec::new();
    let mut ignored = Vec::new();
    let mut skips = Vec::new();
    let expr = unwrap_priority(expr.clone(), 0).unwrap_or_else(|| expr.clone());
    let ast::Expr::List(list) = &expr else {
        skips.push(skip(&expr, why("a list", &expr)));
        return (dbs, ignored, skips);
    };
    for item in list.items() {
        let item = unwrap_priority(item.clone(), 0).unwrap_or(item);
        let ast::Expr::AttrSet(set) = &item else {
            skips.push(skip(&item, why("an attribute set `{ name = \"...\"; }`", &item)));
            continue;
        };
        let mut name = None;
        let mut user = None;
        let mut pass = None;
        let mut bad = None;
        for entry in set.entries() {
            let ast::Entry::AttrpathValue(apv) = entry else {
                bad = Some(skip(&entry, "`inherit` in a database, which mvm does not evaluate"));
                break;
            };
            let key: Option<Vec<String>> = apv
                .attrpath()
                .map(|p| p.attrs().map(|a| attr_name(&a)).collect::<Option<Vec<_>>>())
                .unwrap_or(None);
            let slot = match key.as_deref() {
                Some([k]) if k == "name" => &mut name,
                Some([k]) if k == "user" => &mut user,
                Some([k]) if k == "pass" => &mut pass,
                Some([k, ..]) => {
                    let k = format!("initialDatabases.{k}");
                    if !ignored.contains(&k) {
                        ignored.push(k);
                    }
                    continue;
                }
                _ => {
                    bad = Some(skip(&apv, "a database attribute name is computed with `${...}`"));
                    break;
                }
            };
            match apv.value().map(|v| string_value(&v)) {
                Some(Ok(v)) => *slot = Some(v),
                Some(Err(s)) => {
                    bad = Some(s);
                    break;
                }
                None => {}
            }
        }
        match (bad, name) {
            (Some(s), _) => skips.push(s),
            (None, Some(name)) => dbs.push(InitialDatabase { name, user, pass }),
            (None, None) => skips.push(skip(&item, "a database without a `name`")),
        }
    }
    (dbs, ignored, skips)
}

/// Collect the package names of a `packages` value into `names`, and what
/// cannot be read into `skips`. `Err(offset)` past the nesting limit.
fn packages(
    expr: ast::Expr,
    scope: &ScopeRef,
    depth: u32,
    names: &mut Vec<String>,
    skips: &mut Vec<Skip>,
) -> Result<(), usize> {
    let offset = start(&expr);
    if depth > MAX_DEPTH {
        return Err(offset);
    }
    let expr = unwrap_priority(expr, depth).ok_or(offset)?;
    match &expr {
        ast::Expr::List(list) => {
            for item in list.items() {
                match package_name(&item, scope) {
                    Ok(name) => names.push(name),
                    Err(s) => skips.push(s),
                }
            }
        }
        ast::Expr::With(with) => {
            let ns = with.namespace().and_then(|ns| with_namespace(&ns));
            let scope = push_frame(scope, Frame::With(ns));
            if let Some(body) = with.body() {
                packages(body, &scope, depth + 1, names, skips)?;
            }
        }
        ast::Expr::BinOp(op) if op.operator() == Some(ast::BinOpKind::Concat) => {
            for side in [op.lhs(), op.rhs()].into_iter().flatten() {
                packages(side, scope, depth + 1, names, skips)?;
            }
        }
        other => skips.push(skip(other, why("a list", other))),
    }
    Ok(())
}

/// The nixpkgs attribute path of one `packages` item.
fn package_name(item: &ast::Expr, scope: &ScopeRef) -> Result<String, Skip> {
    let item = match item {
        ast::Expr::Paren(p) => p.expr().unwrap_or_else(|| item.clone()),
        _ => item.clone(),
    };
    let (base, rest) = match &item {
        ast::Expr::Ident(i) => (i.clone(), Vec::new()),
        ast::Expr::Select(sel) if sel.or_token().is_none() => {
            let base = match sel.expr() {
                Some(ast::Expr::Ident(i)) => i,
                _ => return Err(skip(&item, why("a package such as `pkgs.git`", &item))),
            };
            let rest = sel
                .attrpath()
                .map(|p| p.attrs().map(|a| attr_name(&a)).collect::<Option<Vec<_>>>())
                .unwrap_or(None);
            match rest {
                Some(rest) => (base, rest),
                None => return Err(skip(&item, "the package name is computed with `${...}`")),
            }
        }
        other => return Err(skip(other, why("a package such as `pkgs.git`", other))),
    };
    let base_name = base.to_string();
    let mut path = if base_name == "pkgs" && !rest.is_empty() {
        Vec::new()
    } else {
        match resolve(scope, &base_name) {
            Resolved::Pkgs(prefix) => {
                let mut p = prefix;
                p.push(base_name.clone());
                p
            }
            Resolved::Lexical => {
                return Err(skip(
                    &item,
                    format!("`{base_name}` is a variable (argument, `let` or builtin), not a package of pkgs"),
                ))
            }
            Resolved::OtherWith => {
                return Err(skip(
                    &item,
                    format!("`{base_name}` comes from a `with` of something other than pkgs"),
                ))
            }
            Resolved::Undefined => return Err(skip(&item, format!("`{base_name}` is not defined"))),
        }
    };
    path.extend(rest);
    Ok(path.join("."))
}

/// The value of a string literal without interpolation, with Nix's
/// escapes and (for `''` strings) indentation stripping.
fn string_literal(s: &ast::Str) -> Result<String, Skip> {
    let mut indented = false;
    let mut raw = String::new();
    for child in s.node().children_with_tokens() {
        match child {
            rnix::NodeOrToken::Token(t) => match t.kind() {
                SyntaxKind::TOKEN_STRING_START => indented = t.text() == "''",
                SyntaxKind::TOKEN_STRING_CONTENT => raw.push_str(t.text()),
                _ => {}
            },
            rnix::NodeOrToken::Node(n) => {
                return Err(Skip {
                    offset: n.text_range().start().into(),
                    reason: "a string with `${...}` interpolation, which mvm cannot read without evaluating Nix".into(),
                })
            }
        }
    }
    Ok(if indented {
        indented_string(&raw)
    } else {
        plain_string(&raw)
    })
}

/// A `"..."` string's text: `\n`, `\r`, `\t` and `\<c>` escapes; CR and
/// CR LF become LF, as in Nix.
fn plain_string(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            },
            '\r' => {
                out.push('\n');
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// One piece of an indented string as Nix's lexer cuts it: text whose
/// leading spaces are indentation, or the result of an escape (`'''`,
/// `''$`, `''\x`, a lone `$` or `'`) which ends a line's indentation.
struct Piece {
    text: String,
    indentation: bool,
}

fn indented_pieces(raw: &str) -> Vec<Piece> {
    let chars: Vec<char> = raw.chars().collect();
    let mut pieces = Vec::new();
    let mut i = 0;
    let mut text = String::new();
    let escaped = |pieces: &mut Vec<Piece>, text: &mut String, value: String| {
        if !text.is_empty() {
            pieces.push(Piece {
                text: std::mem::take(text),
                indentation: true,
            });
        }
        pieces.push(Piece {
            text: value,
            indentation: false,
        });
    };
    while let Some(&c) = chars.get(i) {
        let next = chars.get(i + 1).copied();
        if c == '\'' && next == Some('\'') {
            match chars.get(i + 2).copied() {
                Some('\'') => {
                    escaped(&mut pieces, &mut text, "''".into());
                    i += 3;
                }
                Some('$') => {
                    escaped(&mut pieces, &mut text, "$".into());
                    i += 3;
                }
                Some('\\') => {
                    let value = match chars.get(i + 3).copied() {
                        Some('n') => "\n".into(),
                        Some('r') => "\r".into(),
                        Some('t') => "\t".into(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    };
                    escaped(&mut pieces, &mut text, value);
                    i += 4;
                }
                // Cannot occur inside the content (it would end the string).
                _ => {
                    text.push_str("''");
                    i += 2;
                }
            }
        } else if (c == '$' && !matches!(next, Some('{' | '\'') | None))
            || (c == '\'' && !matches!(next, Some('\'' | '$') | None))
        {
            // Nix's lexer takes `$x` and `'x` as pairs of ordinary text.
            text.push(c);
            if let Some(n) = next {
                text.push(n);
            }
            i += 2;
        } else if c == '$' || c == '\'' {
            escaped(&mut pieces, &mut text, c.to_string());
            i += 1;
        } else {
            text.push(c);
            i += 1;
        }
    }
    if !text.is_empty() {
        pieces.push(Piece {
            text,
            indentation: true,
        });
    }
    pieces
}

/// A `''...''` string's text, stripped the way Nix strips it: the opening
/// line if it holds only spaces, the smallest indentation (in spaces) of
/// the non-blank lines, and a last line of only spaces.
fn indented_string(raw: &str) -> String {
    let raw = match raw.find('\n') {
        Some(p) if raw[..p].bytes().all(|b| b == b' ') => &raw[p + 1..],
        _ => raw,
    };
    let pieces = indented_pieces(raw);
    let mut at_line_start = true;
    let mut min_indent = usize::MAX;
    let mut indent = 0;
    for piece in &pieces {
        if !piece.indentation {
            if at_line_start {
                at_line_start = false;
                min_indent = min_indent.min(indent);
            }
            continue;
        }
        for c in piece.text.chars() {
            if at_line_start {
                match c {
                    ' ' => indent += 1,
                    '\n' => indent = 0,
                    _ => {
                        at_line_start = false;
                        min_indent = min_indent.min(indent);
                    }
                }
            } else if c == '\n' {
                at_line_start = true;
                indent = 0;
            }
        }
    }
    let mut out = String::new();
    let mut at_line_start = true;
    let mut dropped = 0;
    let count = pieces.len();
    for (n, piece) in pieces.iter().enumerate() {
        let mut s = String::new();
        for c in piece.text.chars() {
            if at_line_start {
                match c {
                    ' ' => {
                        if dropped >= min_indent {
                            s.push(c);
                        }
                        dropped += 1;
                    }
                    '\n' => {
                        dropped = 0;
                        s.push(c);
                    }
                    _ => {
                        at_line_start = false;
                        dropped = 0;
                        s.push(c);
                    }
                }
            } else {
                s.push(c);
                if c == '\n' {
                    at_line_start = true;
                }
            }
        }
        if n + 1 == count {
            if let Some(p) = s.rfind('\n') {
                if s[p + 1..].bytes().all(|b| b == b' ') {
                    s.truncate(p + 1);
                }
            }
        }
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Devenv {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/devenv")
            .join(format!("{name}.nix"));
        read(&path).unwrap()
    }

    fn service(name: &str, enabled: bool) -> DeclaredService {
        DeclaredService {
            name: name.into(),
            kind: ServiceKind::from_devenv_name(name),
            enabled,
            port: None,
            listen_addresses: None,
            initial_databases: Vec::new(),
            initial_script: None,
            ignored: Vec::new(),
        }
    }

    fn db(name: &str, user: Option<&str>, pass: Option<&str>) -> InitialDatabase {
        InitialDatabase {
            name: name.into(),
            user: user.map(Into::into),
            pass: pass.map(Into::into),
        }
    }

    fn skipped(attr: &str, line: u32, column: u32, reason: &str) -> Skipped {
        Skipped {
            attr: attr.into(),
            line,
            column,
            reason: reason.into(),
        }
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn parse_err(text: &str) -> ParseError {
        parse(text).unwrap_err()
    }

    /// The value of the string literal `literal` (as `env.X`).
    fn string(literal: &str) -> String {
        let d = parse(&format!("{{ env.X = {literal}; }}")).unwrap();
        assert_eq!(d.skipped, vec![], "{literal}");
        d.env[0].1.clone()
    }

    #[test]
    fn let_block_wrappers_and_indented_script() {
        let postgres = DeclaredService {
            port: Some(5433),
            listen_addresses: Some("127.0.0.1".into()),
            initial_databases: vec![db("shop", Some("shop"), Some("s3cr3t"))],
            initial_script: Some(
                "CREATE ROLE admin SUPERUSER;\n  -- indented two more\nCREATE EXTENSION IF NOT EXISTS pgcrypto;\n"
                    .into(),
            ),
            ignored: strings(&["package"]),
            ..service("postgres", true)
        };
        let not_static = "the variable `dbName` cannot be read without evaluating Nix";
        assert_eq!(
            fixture("postgres-let"),
            Devenv {
                services: vec![postgres],
                env: pairs(&[("GREET", "devenv")]),
                packages: strings(&["git", "nodejs_20", "python3Packages.pip"]),
                processes: pairs(&[("web", "npm run dev")]),
                skipped: vec![
                    skipped("env.DATABASE_NAME", 10, 23, not_static),
                    skipped("services.postgres.initialDatabases", 23, 16, not_static),
                ],
                other: strings(&["languages", "scripts", "enterShell"]),
            }
        );
    }

    #[test]
    fn nested_sets_without_function_header() {
        let redis = DeclaredService {
            port: Some(6380),
            listen_addresses: Some("0.0.0.0".into()),
            ..service("redis", true)
        };
        let mysql = DeclaredService {
            port: Some(3307),
            initial_databases: vec![db("app", None, None)],
            ignored: strings(&["settings", "initialDatabases.schema", "ensureUsers"]),
            ..service("mysql", true)
        };
        assert_eq!(
            fixture("redis-mysql-nested"),
            Devenv {
                services: vec![redis, mysql, service("memcached", false)],
                env: pairs(&[("REDIS_DB", "0"), ("APP_ENV", "dev")]),
                packages: vec![],
                processes: pairs(&[("worker", "bin/worker --queue default")]),
                skipped: vec![],
                other: vec![],
            }
        );
    }

    #[test]
    fn with_pkgs_concatenation_and_mk_if() {
        let postgres = DeclaredService {
            port: Some(5432),
            ..service("postgres", false)
        };
        assert_eq!(
            fixture("with-pkgs"),
            Devenv {
                services: vec![postgres],
                env: vec![],
                packages: strings(&["git", "jq", "nodePackages.pnpm", "curl"]),
                processes: vec![],
                skipped: vec![
                    skipped(
                        "packages",
                        11,
                        5,
                        "`config` is a variable (argument, `let` or builtin), not a package of pkgs"
                    ),
                    skipped(
                        "packages",
                        12,
                        8,
                        "a function call cannot be read without evaluating Nix"
                    ),
                    skipped(
                        "services.postgres.enable",
                        19,
                        30,
                        "a function call cannot be read without evaluating Nix"
                    ),
                ],
                other: strings(&["cachix", "dotenv", "languages", "pre-commit"]),
            }
        );
    }

    #[test]
    fn wrappers_escapes_unknown_service_and_bad_port() {
        let minio = DeclaredService {
            ignored: strings(&["buckets"]),
            ..service("minio", true)
        };
        assert_eq!(minio.kind, None, "an unknown service is kept, without a kind");
        let postgres = DeclaredService {
            initial_databases: vec![db("a\"b\\c", None, None)],
            ..service("postgres", true)
        };
        let interpolation = "a string with `${...}` interpolation, which mvm cannot read without evaluating Nix";
        assert_eq!(
            fixture("wrappers-strings"),
            Devenv {
                services: vec![service("redis", true), minio, postgres],
                env: pairs(&[
                    ("QUOTED", "tab\there ${HOME} $${USER}"),
                    ("INDENTED", "''quoted''\n  ${not} interpolated\tend\n"),
                ]),
                packages: vec![],
                processes: vec![],
                skipped: vec![
                    skipped("services.redis.port", 7, 31, "port 70000 is not in 1-65535"),
                    skipped("services.postgres.port", 13, 12, "expected an integer, found a string"),
                    skipped("services.postgres.initialScript", 14, 38, interpolation),
                    skipped(
                        "env.FROM_LET",
                        22,
                        18,
                        "the variable `name` cannot be read without evaluating Nix"
                    ),
                    skipped("processes.db.exec", 23, 36, interpolation),
                ],
                other: vec![],
            }
        );
    }

    #[test]
    fn let_binding_shadows_with_pkgs() {
        let mongodb = DeclaredService {
            ignored: strings(&["additionalArgs"]),
            ..service("mongodb", true)
        };
        assert_eq!(
            fixture("let-shadowing"),
            Devenv {
                services: vec![mongodb],
                env: vec![],
                packages: strings(&["ripgrep", "fd"]),
                processes: vec![],
                skipped: vec![
                    skipped(
                        "packages",
                        9,
                        27,
                        "`git` is a variable (argument, `let` or builtin), not a package of pkgs"
                    ),
                    skipped(
                        "packages",
                        9,
                        47,
                        "the variable `tools` cannot be read without evaluating Nix"
                    ),
                ],
                other: strings(&["enterTest"]),
            }
        );
    }

    #[test]
    fn full_stack_project() {
        let postgres = DeclaredService {
            listen_addresses: Some("*".into()),
            initial_databases: vec![db("app", Some("app"), Some("p@ss:w/rd"))],
            ..service("postgres", true)
        };
        let rabbitmq = DeclaredService {
            ignored: strings(&["managementPlugin"]),
            ..service("rabbitmq", true)
        };
        assert_eq!(
            fixture("fullstack"),
            Devenv {
                services: vec![postgres, service("redis", true), rabbitmq],
                env: vec![],
                packages: vec![],
                processes: pairs(&[("api", "npm run api"), ("ui", "npm run ui -- --port 3000\n")]),
                skipped: vec![],
                other: strings(&["name", "languages", "scripts", "enterTest"]),
            }
        );
    }

    #[test]
    fn bare_mk_default_and_mk_option_default() {
        let d = parse(
            "{ lib, ... }: with lib; { services.redis = { enable = mkDefault true; port = mkOptionDefault 7000; }; }",
        )
        .unwrap();
        let redis = DeclaredService {
            port: Some(7000),
            ..service("redis", true)
        };
        assert_eq!(d.services, vec![redis]);
        assert_eq!(d.skipped, vec![]);
    }

    #[test]
    fn enable_must_be_a_literal_true() {
        let d = parse("{ services.postgres.enable = \"true\"; services.redis.enable = !false; }").unwrap();
        assert_eq!(d.services, vec![service("postgres", false), service("redis", false)]);
        assert_eq!(
            d.skipped,
            vec![
                skipped(
                    "services.postgres.enable",
                    1,
                    30,
                    "expected `true` or `false`, found a string"
                ),
                skipped(
                    "services.redis.enable",
                    1,
                    62,
                    "an operator expression cannot be read without evaluating Nix"
                ),
            ]
        );
    }

    #[test]
    fn parse_error_has_line_and_column() {
        let e = parse_err("{ pkgs, ... }:\n{\n  services.postgres.enable = true\n  services.redis.enable = true;\n}\n");
        assert_eq!((e.line, e.column), (4, 25), "{e}");
        assert_eq!(e.message, "unexpected `=`, expected `;`");
        assert_eq!(e.to_string(), "line 4, column 25: unexpected `=`, expected `;`");

        let e = parse_err("{\n  env.A = \"unterminated;\n}\n");
        assert_eq!((e.line, e.column), (2, 12), "{e}");
        let e = parse_err("{ services.postgres = { enable = true; };");
        assert_eq!((e.line, e.column), (1, 42), "{e}");
        assert!(e.message.contains("end of file"), "{e}");
    }

    #[test]
    fn not_an_attribute_set_is_an_error() {
        let e = parse_err("{ pkgs, ... }:\nimport ./devenv-common.nix { inherit pkgs; }\n");
        assert_eq!((e.line, e.column), (2, 1), "{e}");
        assert!(e.message.contains("must be an attribute set"), "{e}");
        let e = parse_err("  # only a comment\n");
        assert_eq!(e.to_string(), "line 2, column 1: unexpected end of file");
    }

    #[test]
    fn duplicate_definition_is_an_error_like_in_nix() {
        let e = parse_err("{\n  services.redis.port = 1;\n  services.redis = { port = 2; };\n}");
        assert_eq!((e.line, e.column), (3, 29), "{e}");
        assert_eq!(
            e.message,
            "attribute `services.redis.port` already defined at line 2, column 25"
        );
        // A definition under a value that is not a set literal.
        let e = parse_err("{ env = { }; env.A = \"1\"; services = x; services.redis.enable = true; }");
        assert!(e.message.contains("`services` already defined"), "{e}");
        // Set literals merge, as in Nix.
        let d = parse("{ services.redis = { }; services.redis.port = 1; env = { }; }").unwrap();
        let redis = DeclaredService {
            port: Some(1),
            ..service("redis", false)
        };
        assert_eq!(d.services, vec![redis]);
    }

    #[test]
    fn ports_out_of_range_and_not_integers() {
        let d = parse(
            "{ services.a.port = 0; services.b.port = -1; services.c.port = 65536; \
             services.d.port = 99999999999999999999; services.e.port = 5432.0; services.f.port = 65535; }",
        )
        .unwrap();
        let reasons: Vec<(&str, &str)> = d.skipped.iter().map(|s| (s.attr.as_str(), s.reason.as_str())).collect();
        assert_eq!(
            reasons,
            vec![
                ("services.a.port", "port 0 is not in 1-65535"),
                ("services.b.port", "port -1 is not in 1-65535"),
                ("services.c.port", "port 65536 is not in 1-65535"),
                ("services.d.port", "the port is too large an integer"),
                ("services.e.port", "expected an integer, found a number"),
            ]
        );
        assert_eq!(d.services.last().and_then(|s| s.port), Some(65535));
    }

    #[test]
    fn computed_names_inherit_and_odd_shapes_are_skipped() {
        let d = parse(
            "{ name, pkgs, ... }: rec {\n  services.${name}.enable = true;\n  env = { inherit name; B.c = \"x\"; };\n  \
             packages = pkgs.lib.unique [ ];\n  processes.web = \"npm start\";\n  services.postgres = import ./pg.nix;\n}",
        )
        .unwrap();
        assert_eq!(
            d.skipped,
            vec![
                skipped(
                    "services.${...}.enable",
                    2,
                    29,
                    "the service name is computed with `${...}`"
                ),
                skipped(
                    "env.name",
                    3,
                    19,
                    "`inherit` takes the value of a variable, which mvm does not evaluate"
                ),
                skipped(
                    "env.B.c",
                    3,
                    31,
                    "an environment variable must be a string, not an attribute set"
                ),
                skipped(
                    "packages",
                    4,
                    14,
                    "a function call cannot be read without evaluating Nix"
                ),
                skipped(
                    "processes.web",
                    5,
                    19,
                    "expected an attribute set with `exec`, found a string"
                ),
                skipped(
                    "services.postgres",
                    6,
                    23,
                    "a function call cannot be read without evaluating Nix"
                ),
            ]
        );
        assert_eq!(d.services, vec![service("postgres", false)]);
    }

    #[test]
    fn package_forms() {
        let d = parse(
            "{ pkgs, lib, ... }: { packages = [ pkgs.\"nodejs-18_x\" (pkgs.python3.withPackages (ps: [ ps.requests ])) \
             pkgs.foo or pkgs.bar ] ++ (with pkgs.python3Packages; [ black ]) ++ (with pkgs; with lib; [ jq ]) \
             ++ [ undefinedName ]; }",
        )
        .unwrap();
        assert_eq!(d.packages, strings(&["nodejs-18_x", "python3Packages.black"]));
        let reasons: Vec<&str> = d.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(
            reasons,
            vec![
                "a function call cannot be read without evaluating Nix",
                "an attribute of a variable cannot be read without evaluating Nix",
                "`jq` comes from a `with` of something other than pkgs",
                "`undefinedName` is not defined",
            ]
        );
    }

    #[test]
    fn plain_string_escapes() {
        assert_eq!(string(r#""a\nb\tc\rd\"e\\f\$g""#), "a\nb\tc\rd\"e\\f$g");
        assert_eq!(string(r#""\${x} $${y} $z""#), "${x} $${y} $z");
        assert_eq!(string("\"cr\r\nlf\rx\""), "cr\nlf\nx");
        assert_eq!(string(r#""""#), "");
    }

    #[test]
    fn indented_string_stripping() {
        assert_eq!(string("''\n    a\n      b\n    c\n  ''"), "a\n  b\nc\n");
        // Blank lines do not count for the indentation.
        assert_eq!(string("''\n    a\n\n        \n    b''"), "a\n\n    \nb");
        // The first line holds text: it counts with no indentation.
        assert_eq!(string("''first\n    second''"), "first\n    second");
        // Spaces after the opening quotes are part of the first line.
        assert_eq!(string("''  \n  x\n''"), "x\n");
        // Tabs are not indentation.
        assert_eq!(string("''\n\tfoo\n  bar\n''"), "\tfoo\n  bar\n");
        // Escapes end a line's indentation.
        assert_eq!(
            string("''\n    '''x'''\n    ''${y}\n    a''\\nb ''\\t'''\n''"),
            "''x''\n${y}\na\nb \t''\n"
        );
        assert_eq!(string("''\n      ''$\n    z\n''"), "  $\nz\n");
        // `$` and `'` on their own are text.
        assert_eq!(string("''\n  it's $5 and $'\n''"), "it's $5 and $'\n");
        assert_eq!(string("''  ''"), "");
        assert_eq!(string("''''"), "");
    }

    #[test]
    fn attribute_names_in_quotes_are_read() {
        let d = parse("{ env.\"A B\" = \"1\"; env.${\"C\"} = \"2\"; }").unwrap();
        assert_eq!(d.env, pairs(&[("A B", "1"), ("C", "2")]));
    }

    #[test]
    fn hostile_nesting_is_an_error_not_a_crash() {
        for text in [
            "[".repeat(100_000),
            "- ".repeat(100_000),
            "-".repeat(100_000),
            "a.".repeat(100_000),
            "!".repeat(100_000),
            "a ++ ".repeat(50_000),
            "x".repeat(300 << 10),
            "(".repeat(100_000),
            "{ a = ".repeat(20_000),
            "x: ".repeat(50_000),
            "with a; ".repeat(30_000),
            format!("{{ packages = {}[ ]; }}", "[ ] ++ ".repeat(500)),
            format!("{{ x = {}1{}; }}", "{ a = ".repeat(300), "; }".repeat(300)),
            format!("{{ x = {}1{}; }}", "(".repeat(500), ")".repeat(500)),
            format!(
                "{{ services.redis.port = {}1{}; }}",
                "lib.mkDefault (".repeat(200),
                ")".repeat(200)
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.line >= 1 && e.column >= 1, "{e}");
        }
    }

    #[test]
    fn detect_and_read_name_the_file() {
        let dir = std::env::temp_dir().join(format!("mvm-devenv-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(detect(&dir), None);
        std::fs::write(dir.join("devenv.nix"), "{ services.redis.enable = true }\n").unwrap();
        std::fs::write(dir.join("devenv.yaml"), "inputs: {}\n").unwrap();
        assert_eq!(
            detect(&dir),
            Some(DevenvFiles {
                nix: dir.join("devenv.nix"),
                yaml: Some(dir.join("devenv.yaml")),
                lock: None,
            })
        );
        let e = read(&dir.join("devenv.nix")).unwrap_err();
        let text = e.to_string();
        let expected = format!("{}: line 1, column 32: ", dir.join("devenv.nix").display());
        assert!(text.starts_with(&expected), "{text}");
        assert_eq!(e.exit_code(), 2);
        assert!(matches!(read(&dir.join("missing.nix")), Err(crate::Error::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn service_table() {
        assert_eq!(ServiceKind::from_devenv_name("postgres"), Some(ServiceKind::Postgres));
        assert_eq!(ServiceKind::from_devenv_name("mysql"), Some(ServiceKind::Mysql));
        assert_eq!(ServiceKind::from_devenv_name("postgresql"), None);
        for kind in ServiceKind::ALL {
            for name in kind.devenv_names() {
                assert_eq!(ServiceKind::from_devenv_name(name), Some(kind));
            }
        }
        let ports: Vec<u16> = ServiceKind::ALL.iter().map(|k| k.default_port()).collect();
        assert_eq!(ports, vec![5432, 6379, 3306, 27017, 11211, 5672, 9200, 9200]);
        assert_eq!(ServiceKind::Postgres.debian_packages(), &["postgresql"]);
        assert_eq!(ServiceKind::Redis.debian_packages(), &["redis-server"]);
        assert_eq!(ServiceKind::Mysql.debian_packages(), &["mariadb-server"]);
        assert!(ServiceKind::Mongodb.debian_packages().is_empty());
        let guest: Vec<Option<&str>> = ServiceKind::ALL
            .iter()
            .map(|k| k.guest_kind().map(GuestKind::as_str))
            .collect();
        for g in GuestKind::ALL {
            assert_eq!(ServiceKind::from_guest(g).guest_kind(), Some(g));
        }
        assert_eq!(
            guest,
            vec![
                Some("postgresql"),
                Some("redis"),
                Some("mariadb"),
                None,
                None,
                None,
                None,
                None
            ]
        );
    }

    #[test]
    fn connection_environment() {
        assert_eq!(
            ServiceKind::Postgres.connection_env("127.0.0.1", 5433, Some("my db"), "app", Some("p@ss:w/rd")),
            pairs(&[
                ("DATABASE_URL", "postgres://app:p%40ss%3Aw%2Frd@127.0.0.1:5433/my%20db"),
                ("PGHOST", "127.0.0.1"),
                ("PGPORT", "5433"),
                ("PGUSER", "app"),
                ("PGDATABASE", "my db"),
                ("PGPASSWORD", "p@ss:w/rd"),
            ])
        );
        assert_eq!(
            ServiceKind::Postgres.connection_env("::1", 5432, None, "postgres", None),
            pairs(&[
                ("DATABASE_URL", "postgres://postgres@[::1]:5432"),
                ("PGHOST", "::1"),
                ("PGPORT", "5432"),
                ("PGUSER", "postgres"),
            ])
        );
        assert_eq!(
            ServiceKind::Redis.connection_env("localhost", 6380, None, "ignored", None),
            pairs(&[
                ("REDIS_URL", "redis://localhost:6380"),
                ("REDIS_HOST", "localhost"),
                ("REDIS_PORT", "6380"),
            ])
        );
        assert_eq!(
            ServiceKind::Mysql.connection_env("127.0.0.1", 3306, Some("app"), "root", None),
            pairs(&[
                ("DATABASE_URL", "mysql://root@127.0.0.1:3306/app"),
                ("MYSQL_HOST", "127.0.0.1"),
                ("MYSQL_TCP_PORT", "3306"),
                ("MYSQL_USER", "root"),
                ("MYSQL_DATABASE", "app"),
            ])
        );
        assert_eq!(
            ServiceKind::Mongodb.connection_env("127.0.0.1", 27017, Some("app"), "admin", None),
            pairs(&[("MONGODB_URI", "mongodb://127.0.0.1:27017/app")])
        );
    }
}
