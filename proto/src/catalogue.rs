//! The state catalogue: typed parameters for every module of `states.md`.
//!
//! Each module is one struct, declared once in the table at the bottom of this file
//! with its parameters' wire names, older spellings, types and defaults. From that one
//! declaration come the struct, its parser, its [`ModuleSpec`] (for `opsagent check`
//! and the README's table) and its variant of [`ModuleParams`], the helper's request
//! format.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::param_types::{
    describe, normalise_name, same_name, Account, AccountName, AccountNames, Array, Dict, HomeFile, KeySource, Kind,
    Line, LocalFile, Mode, Param, PathDict, PathParam, Paths, Port, Program, StateRefs, Text, Watch,
};

/// Why a state's module or parameters were refused. The message names the parameter,
/// what was expected and what was received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CatalogueError {
    #[error("unknown module {0:?} (not in the state catalogue)")]
    UnknownModule(String),
    #[error("{module}: missing required parameter {param:?}")]
    Missing { module: String, param: String },
    #[error("{module}: parameter {param:?}: expected {expected}, got {got}")]
    WrongType { module: String, param: String, expected: String, got: String },
    #[error("{module}: parameter {param:?}: {problem}")]
    Invalid { module: String, param: String, problem: String },
    #[error("state parameters must be a JSON object, got {0}")]
    NotAnObject(String),
}

/// How a parameter may be omitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    Required,
    Optional,
    /// Omitted means this value (as it would appear on the wire).
    Default(&'static str),
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ParamSpec {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    pub presence: Presence,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ModuleSpec {
    pub name: &'static str,
    pub summary: &'static str,
    /// Run inside the round engine, never sent to the helper.
    pub builtin: bool,
    pub params: &'static [ParamSpec],
}

/// A state's raw parameters, consumed as the module's parser takes them by name (see
/// [`same_name`]); what is left over is reported as unknown. A name given in two
/// spellings counts once, with the value given last.
///
/// A list, not a map keyed by normalised names: a state has a dozen parameters at most,
/// and typing one (every state, every round, in the daemon and again in the helper) then
/// allocates no key.
pub struct ParamBag<'a> {
    module: &'static str,
    /// As received, but for null values (the original adaptor dropped `None` values:
    /// null means "not given").
    entries: Vec<(&'a str, &'a Value)>,
}

impl<'a> ParamBag<'a> {
    fn new(module: &'static str, raw: &'a Map<String, Value>) -> Self {
        let entries = raw.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.as_str(), v)).collect();
        Self { module, entries }
    }

    /// The value of the first of `name` and `aliases` given (the last value given under
    /// that name), taken out with every other spelling of that name.
    fn take_raw(&mut self, name: &str, aliases: &[&str]) -> Option<(&'a str, &'a Value)> {
        std::iter::once(name).chain(aliases.iter().copied()).find_map(|n| {
            let last = self.entries.iter().rev().find(|(k, _)| same_name(k, n)).copied()?;
            self.entries.retain(|(k, _)| !same_name(k, n));
            Some(last)
        })
    }

    fn convert<T: Param>(&self, name: &str, v: &Value) -> Result<T, CatalogueError> {
        T::from_wire(v).map_err(|reason| match reason {
            Some(problem) => {
                CatalogueError::Invalid { module: self.module.to_string(), param: name.to_string(), problem }
            }
            None => CatalogueError::WrongType {
                module: self.module.to_string(),
                param: name.to_string(),
                expected: T::KIND.expected().to_string(),
                got: describe(v),
            },
        })
    }

    /// An optional parameter. A blank string for a non-string type is "not given": the
    /// IDE sends `""` for fields the user left empty.
    pub fn optional<T: Param>(&mut self, name: &str, aliases: &[&str]) -> Result<Option<T>, CatalogueError> {
        let Some((_, v)) = self.take_raw(name, aliases) else {
            return Ok(None);
        };
        let blank = matches!(v, Value::String(s) if s.trim().is_empty());
        if blank
            && matches!(
                T::KIND,
                Kind::Bool
                    | Kind::Integer
                    | Kind::Mode
                    | Kind::Watch
                    | Kind::State
                    | Kind::Path
                    | Kind::Account
                    | Kind::Port
                    | Kind::Cron
                    | Kind::AccountName
                    | Kind::LocalFile
                    | Kind::KeySource
                    | Kind::Program
                    | Kind::HomeFile
            )
        {
            return Ok(None);
        }
        self.convert(name, v).map(Some)
    }

    pub fn required<T: Param>(&mut self, name: &str, aliases: &[&str]) -> Result<T, CatalogueError> {
        let missing = || CatalogueError::Missing { module: self.module.to_string(), param: name.to_string() };
        match self.take_raw(name, aliases) {
            None => Err(missing()),
            Some((_, Value::String(s))) if s.trim().is_empty() && !matches!(T::KIND, Kind::Text) => Err(missing()),
            Some((_, v)) => self.convert(name, v),
        }
    }

    pub fn with_default<T: Param>(
        &mut self,
        name: &str,
        aliases: &[&str],
        default: &Value,
    ) -> Result<T, CatalogueError> {
        match self.optional(name, aliases)? {
            Some(v) => Ok(v),
            None => self.convert(name, default),
        }
    }

    /// The names not taken, as given, in the order of their normalised names (each name
    /// once, in the spelling given last).
    fn leftovers(self) -> Vec<String> {
        let named: BTreeMap<String, &str> = self.entries.into_iter().map(|(k, _)| (normalise_name(k), k)).collect();
        named.into_values().map(str::to_string).collect()
    }
}

/// A state whose module and parameters passed the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parsed {
    pub params: ModuleParams,
    /// Unknown parameters and other non-fatal findings, for the state's comment.
    pub warnings: Vec<String>,
}

/// Parses one state's parameters for `module`: renders `$identifier` placeholders from
/// the state's own parameters (as the original did for every module), then types every
/// known parameter, and reports the rest as warnings. This is the daemon's reading of a
/// recipe.
pub fn parse_state(module: &str, raw: &Value) -> Result<Parsed, CatalogueError> {
    let spec = spec(module).ok_or_else(|| CatalogueError::UnknownModule(module.to_string()))?;
    let obj = params_object(raw)?;
    // Most states have no placeholder at all: their parameters are read as they are,
    // not copied first (a recipe of thousands of states is parsed on every push).
    let rendered;
    let obj = if obj.values().any(has_placeholder) {
        rendered = render_placeholders(obj);
        &rendered
    } else {
        obj
    };
    let (params, leftovers) = parse_object(spec, obj)?;
    let warnings = leftovers.into_iter().map(|k| format!("unknown parameter {k:?} ignored by {}", spec.name)).collect();
    Ok(Parsed { params, warnings })
}

/// Reads typed parameters back from their serialised form (the body of the helper's
/// `Apply`): the same parsers and checks as [`parse_state`], without rendering
/// placeholders (the daemon did; a `$` left in a value is meant literally), and an
/// unknown parameter is an error (the daemon never sends one). This is the only way
/// [`ModuleParams`] is deserialised.
pub fn parse_params(module: &str, raw: &Value) -> Result<ModuleParams, CatalogueError> {
    let spec = spec(module).ok_or_else(|| CatalogueError::UnknownModule(module.to_string()))?;
    let (params, leftovers) = parse_object(spec, params_object(raw)?)?;
    match leftovers.into_iter().next() {
        Some(param) => Err(CatalogueError::Invalid {
            module: spec.name.to_string(),
            param,
            problem: "not a parameter of this module".into(),
        }),
        None => Ok(params),
    }
}

fn params_object(raw: &Value) -> Result<&Map<String, Value>, CatalogueError> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    match raw {
        Value::Object(o) => Ok(o),
        Value::Null => Ok(EMPTY.get_or_init(Map::new)),
        other => Err(CatalogueError::NotAnObject(describe(other))),
    }
}

/// The typed, checked parameters and the names of those the module does not know.
fn parse_object(
    spec: &'static ModuleSpec,
    obj: &Map<String, Value>,
) -> Result<(ModuleParams, Vec<String>), CatalogueError> {
    let mut bag = ParamBag::new(spec.name, obj);
    let params = parse_module(spec.name, &mut bag)?;
    params.check()?;
    Ok((params, bag.leftovers()))
}

/// How [`ModuleParams`] arrive on the wire: the module's name and its parameters.
#[derive(Deserialize)]
pub struct WireParams {
    module: String,
    #[serde(default)]
    params: Value,
}

impl TryFrom<WireParams> for ModuleParams {
    type Error = CatalogueError;
    fn try_from(w: WireParams) -> Result<Self, CatalogueError> {
        parse_params(&w.module, &w.params)
    }
}

pub fn spec(module: &str) -> Option<&'static ModuleSpec> {
    MODULES.iter().find(|m| m.name == module)
}

/// Python `string.Template.safe_substitute` over every string of the parameters, with
/// the state's own scalar parameters as the mapping: `$name` and `${name}` are
/// replaced when `name` is a parameter, `$$` becomes `$`, anything else stays.
pub fn render_placeholders(params: &Map<String, Value>) -> Map<String, Value> {
    let vars: BTreeMap<String, String> = params
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((k.to_ascii_lowercase(), text))
        })
        .collect();
    params.iter().map(|(k, v)| (k.clone(), render_value(v, &vars))).collect()
}

/// Whether [`render_value`] could change `v`: a `$` in any string of it.
fn has_placeholder(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('$'),
        Value::Array(items) => items.iter().any(has_placeholder),
        Value::Object(o) => o.values().any(has_placeholder),
        _ => false,
    }
}

fn render_value(v: &Value, vars: &BTreeMap<String, String>) -> Value {
    match v {
        Value::String(s) if s.contains('$') => Value::String(substitute(s, vars)),
        Value::Array(items) => Value::Array(items.iter().map(|i| render_value(i, vars)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, i)| (k.clone(), render_value(i, vars))).collect()),
        other => other.clone(),
    }
}

fn substitute(s: &str, vars: &BTreeMap<String, String>) -> String {
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_';
    let is_cont = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) if braced[..end].starts_with(is_start) && braced[..end].chars().all(is_cont) => {
                    (&braced[..end], end + 2)
                }
                _ => ("", 0),
            }
        } else if after.starts_with(is_start) {
            let end = after.find(|c: char| !is_cont(c)).unwrap_or(after.len());
            (&after[..end], end)
        } else {
            ("", 0)
        };
        match vars.get(&name.to_ascii_lowercase()).filter(|_| !name.is_empty()) {
            Some(value) => {
                out.push_str(value);
                rest = &after[consumed..];
            }
            None => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

macro_rules! field_type {
    (required, $t:ty) => { $t };
    (default, $t:ty) => { $t };
    (optional, $t:ty) => { Option<$t> };
}

macro_rules! presence {
    (required) => {
        Presence::Required
    };
    (optional) => {
        Presence::Optional
    };
    (default, $d:tt) => {
        Presence::Default(stringify!($d))
    };
}

macro_rules! take_field {
    ($bag:ident, required, $t:ty, $wire:expr, $aliases:expr) => {
        $bag.required::<$t>($wire, $aliases)?
    };
    ($bag:ident, optional, $t:ty, $wire:expr, $aliases:expr) => {
        $bag.optional::<$t>($wire, $aliases)?
    };
    ($bag:ident, default, $t:ty, $wire:expr, $aliases:expr, $d:tt) => {
        $bag.with_default::<$t>($wire, $aliases, &serde_json::json!($d))?
    };
}

macro_rules! catalogue {
    ($(
        $(#[doc = $doc:literal])*
        $ty:ident = $module:literal, builtin = $builtin:literal {
            $( $field:ident : $pty:ty = $wire:literal $([$($alias:literal),*])? => $presence:ident $(($default:tt))? ; )*
        }
    )*) => {
        $(
            $(#[doc = $doc])*
            // Serialize only: parameters are read through the catalogue, never by serde
            // on their own (see `ModuleParams`).
            #[derive(Debug, Clone, PartialEq, Serialize)]
            pub struct $ty {
                $( pub $field: field_type!($presence, $pty), )*
            }

            impl $ty {
                pub const SPEC: ModuleSpec = ModuleSpec {
                    name: $module,
                    summary: concat!($($doc),*),
                    builtin: $builtin,
                    params: &[$(ParamSpec {
                        name: $wire,
                        aliases: &[$($($alias),*)?],
                        kind: <$pty as Param>::KIND,
                        presence: presence!($presence $(, $default)?),
                    }),*],
                };

                fn parse(bag: &mut ParamBag<'_>) -> Result<Self, CatalogueError> {
                    Ok(Self {
                        $( $field: take_field!(bag, $presence, $pty, $wire, &[$($($alias),*)?] $(, $default)?), )*
                    })
                }
            }
        )*

        /// The typed parameters of one state, tagged with its module name. This is
        /// also the body of the helper's `Apply` request. Deserialising goes through
        /// [`parse_params`], so the helper runs every check `opsagent check` runs: no
        /// value reaches a module unchecked.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "module", content = "params", try_from = "WireParams")]
        pub enum ModuleParams {
            $( #[serde(rename = $module)] $ty($ty), )*
        }

        impl ModuleParams {
            pub fn name(&self) -> &'static str {
                match self { $( ModuleParams::$ty(_) => $module, )* }
            }

            pub fn spec(&self) -> &'static ModuleSpec {
                match self { $( ModuleParams::$ty(_) => &$ty::SPEC, )* }
            }
        }

        $(
            impl TryFrom<ModuleParams> for $ty {
                type Error = ModuleParams;
                /// This module's parameters, or the other module's back.
                fn try_from(p: ModuleParams) -> Result<Self, ModuleParams> {
                    match p {
                        ModuleParams::$ty(x) => Ok(x),
                        other => Err(other),
                    }
                }
            }
        )*

        /// Every module the backend can send, in catalogue order.
        pub static MODULES: &[ModuleSpec] = &[$( $ty::SPEC ),*];

        fn parse_module(module: &str, bag: &mut ParamBag<'_>) -> Result<ModuleParams, CatalogueError> {
            match module {
                $( $module => $ty::parse(bag).map(ModuleParams::$ty), )*
                other => Err(CatalogueError::UnknownModule(other.to_string())),
            }
        }
    };
}

impl ModuleParams {
    /// Built-ins run in the round engine; everything else goes to the helper.
    pub fn is_builtin(&self) -> bool {
        self.spec().builtin
    }

    /// Checks across parameters, and value sets narrower than a wire type, that can be
    /// judged without looking at the host; then what each value names
    /// ([`crate::checks`]).
    fn check(&self) -> Result<(), CatalogueError> {
        self.check_sets()?;
        crate::checks::check_fields(self)
    }

    fn check_sets(&self) -> Result<(), CatalogueError> {
        let invalid = |param: &str, problem: String| {
            Err(CatalogueError::Invalid { module: self.name().to_string(), param: param.to_string(), problem })
        };
        let one_of = |param: &str, value: &str, allowed: &[&str]| {
            if allowed.iter().any(|a| a.eq_ignore_ascii_case(value)) {
                Ok(())
            } else {
                invalid(param, format!("{value:?} is not one of {}", allowed.join(", ")))
            }
        };
        match self {
            ModuleParams::LinuxCronjob(c) => {
                if c.cmd.is_empty() || c.cmd.iter().any(|l| l.trim().is_empty()) {
                    // The original suite expects `cmd: [""]` to fail: an entry that runs
                    // nothing is a mistake in the recipe.
                    return invalid("cmd", "an empty command".into());
                }
                if c.cmd.iter().any(|l| l.contains('\n')) {
                    return invalid("cmd", "a cron command may not contain a newline".into());
                }
                Ok(())
            }
            // Any type a `mkfs.TYPE` exists for (the helper looks for the tool).
            ModuleParams::LinuxMkfs(m) => {
                let t = m.fstype.trim();
                if !t.is_empty() && t.len() <= 16 && t.chars().all(|c| c.is_ascii_alphanumeric()) {
                    Ok(())
                } else {
                    invalid("fstype", format!("{t:?} is not a filesystem type (letters and digits, as in mkfs.TYPE)"))
                }
            }
            ModuleParams::LinuxRaid(r) => one_of(
                "level",
                &r.level,
                &[
                    "linear",
                    "raid0",
                    "0",
                    "stripe",
                    "raid1",
                    "1",
                    "mirror",
                    "raid4",
                    "4",
                    "raid5",
                    "5",
                    "raid6",
                    "6",
                    "raid10",
                    "10",
                    "multipath",
                    "mp",
                    "faulty",
                    "container",
                ],
            ),
            ModuleParams::LinuxService(s) if s.name.is_empty() => invalid("name", "no service named".into()),
            ModuleParams::LinuxSelinux(x) => {
                if let Some(m) = x.mode.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
                    one_of("mode", m, &["enforcing", "permissive", "disabled"])?;
                } else if x.boolean.as_ref().is_none_or(|b| b.is_empty()) {
                    return invalid("mode", "neither a mode nor a boolean given: nothing to do".into());
                }
                for e in x.boolean.iter().flat_map(|b| b.iter()) {
                    let name = e.key.trim();
                    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return invalid("boolean", format!("{name:?} is not an SELinux boolean name"));
                    }
                    one_of("boolean", e.value_or_empty().trim(), &["on", "off", "true", "false", "1", "0"])?;
                }
                Ok(())
            }
            ModuleParams::CommonSshAuth(a) => {
                let given = a.authname.as_deref().is_some_and(|n| !n.trim().is_empty())
                    || a.content.as_deref().is_some_and(|c| !c.trim().is_empty());
                if given {
                    Ok(())
                } else {
                    invalid("content", "no key given (authname or content)".into())
                }
            }
            ModuleParams::LinuxDir(d) if d.path.is_empty() => invalid("path", "no directory named".into()),
            _ => Ok(()),
        }
    }
}

/// A time field of `linux.cronjob`, with its range and names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CronField {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

const MONTH_NAMES: &[&str] = &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const DAY_NAMES: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl CronField {
    pub const ALL: [CronField; 5] =
        [CronField::Minute, CronField::Hour, CronField::DayOfMonth, CronField::Month, CronField::DayOfWeek];

    pub fn param(self) -> &'static str {
        match self {
            CronField::Minute => "minute",
            CronField::Hour => "hour",
            CronField::DayOfMonth => "day-of-month",
            CronField::Month => "month",
            CronField::DayOfWeek => "day-of-week",
        }
    }

    /// The values the field takes (day of week: 0 and 7 are both Sunday).
    pub fn range(self) -> (u32, u32) {
        match self {
            CronField::Minute => (0, 59),
            CronField::Hour => (0, 23),
            CronField::DayOfMonth => (1, 31),
            CronField::Month => (1, 12),
            CronField::DayOfWeek => (0, 7),
        }
    }

    fn names(self) -> (&'static [&'static str], u32) {
        match self {
            CronField::Month => (MONTH_NAMES, 1),
            CronField::DayOfWeek => (DAY_NAMES, 0),
            _ => (&[], 0),
        }
    }

    /// Salt's `cron.present` field syntax, written with numbers only: `*`, numbers,
    /// month and day names (`jan`, `Mon`; in ranges and lists too, which not every
    /// cron accepts, hence the numbers), ranges, lists, `/step` after a range or `*`;
    /// or `random` (kept as it is: the helper picks the value). Empty means `*`.
    pub fn normalise(self, raw: &str) -> Result<String, String> {
        let field = raw.trim();
        let (lo, hi) = self.range();
        if field.is_empty() {
            return Ok("*".into());
        }
        if field.eq_ignore_ascii_case("random") {
            return Ok("random".into());
        }
        let bad = |why: &str| Err(format!("{field:?} is not a cron {} field ({lo}-{hi}{why})", self.param()));
        let (names, base) = self.names();
        let value = |s: &str| -> Option<u32> {
            if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
                return u32::try_from(i).ok().map(|i| i + base);
            }
            s.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| s.parse::<u32>().ok())
                .flatten()
                .filter(|n| (lo..=hi).contains(n))
        };
        let mut out = Vec::new();
        for part in field.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (part, None),
            };
            let range_text = if range == "*" {
                "*".to_string()
            } else if let Some((a, b)) = range.split_once('-') {
                match (value(a), value(b)) {
                    (Some(a), Some(b)) if a <= b => format!("{a}-{b}"),
                    (Some(_), Some(_)) => return bad(", a range goes upwards"),
                    _ => return bad(""),
                }
            } else if step.is_some() {
                return bad(", a step follows a range or *");
            } else {
                match value(range) {
                    Some(n) => n.to_string(),
                    None => return bad(""),
                }
            };
            match step {
                None => out.push(range_text),
                Some(s) => match s.parse::<u32>() {
                    Ok(n) if n > 0 && s.bytes().all(|b| b.is_ascii_digit()) => out.push(format!("{range_text}/{n}")),
                    _ => return bad(", a step is a positive number"),
                },
            }
        }
        Ok(out.join(","))
    }
}

/// One time field of `linux.cronjob`, as [`CronField::normalise`] wrote it: only what
/// cron reads as one field (no blank, no newline: the field cannot carry a second
/// crontab line), or `random`. `F` is the field's position in [`CronField::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CronTime<const F: usize>(String);

impl<const F: usize> CronTime<F> {
    pub const FIELD: CronField = CronField::ALL[F];

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const F: usize> std::ops::Deref for CronTime<F> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<const F: usize> Param for CronTime<F> {
    const KIND: Kind = Kind::Cron;
    fn from_wire(v: &Value) -> Result<Self, Option<String>> {
        let Line(raw) = Line::from_wire(v)?;
        Self::FIELD.normalise(&raw).map(Self).map_err(Some)
    }
}

pub type CronMinute = CronTime<0>;
pub type CronHour = CronTime<1>;
pub type CronDayOfMonth = CronTime<2>;
pub type CronMonth = CronTime<3>;
pub type CronDayOfWeek = CronTime<4>;

impl LinuxCronjob {
    /// Each time field and its value (normalised; absent means `*`).
    pub fn fields(&self) -> [(CronField, Option<&str>); 5] {
        [
            (CronField::Minute, self.minute.as_deref()),
            (CronField::Hour, self.hour.as_deref()),
            (CronField::DayOfMonth, self.day_of_month.as_deref()),
            (CronField::Month, self.month.as_deref()),
            (CronField::DayOfWeek, self.day_of_week.as_deref()),
        ]
    }
}

catalogue! {
    /// Downloads an http(s) archive and extracts it into a directory.
    CommonArchive = "common.archive", builtin = false {
        path: PathParam = "path" => required;
        source: Line = "source" => required;
        checksum: Line = "checksum" => optional;
        if_path_absent: Paths = "if-path-absent" => optional;
    }
    /// Adds a RubyGems source (`gem sources --add URL`), once.
    CommonGemSource = "common.gem.source", builtin = false {
        url: Line = "url" ["name"] => required;
    }
    /// Installs or removes Ruby gems.
    CommonGemPackage = "common.gem.package", builtin = false {
        name: Dict = "name" => required;
    }
    /// Clones a git repository and keeps it at a revision.
    CommonGit = "common.git", builtin = false {
        path: PathParam = "path" ["target"] => required;
        repo: Line = "repo" => required;
        force: bool = "force" ["force-checkout"] => default(false);
        revision: Line = "revision" ["rev"] => default("master");
        ssh_key_file: PathParam = "ssh-key-file" ["identity"] => optional;
        user: Account = "user" => optional;
    }
    /// Clones or updates a Mercurial repository.
    CommonHg = "common.hg", builtin = false {
        path: PathParam = "path" ["target"] => required;
        repo: Line = "repo" => required;
        force: bool = "force" => default(false);
        revision: Line = "revision" ["rev", "branch"] => default("default");
        user: Account = "user" => optional;
    }
    /// Installs or removes Node.js packages, globally or under `path`.
    CommonNpmPackage = "common.npm.package", builtin = false {
        name: Dict = "name" => required;
        path: PathParam = "path" ["dir"] => optional;
    }
    /// Installs or removes Python packages with pip.
    CommonPipPackage = "common.pip.package", builtin = false {
        name: Dict = "name" => required;
        install_options: Line = "install-options" => optional;
    }
    /// Checks out or updates an SVN working copy.
    CommonSvn = "common.svn", builtin = false {
        path: PathParam = "path" ["target"] => required;
        repo: Line = "repo" => required;
        force: bool = "force" => default(false);
        password: Line = "password" => optional;
        revision: Line = "revision" ["rev"] => default("HEAD");
        user: Account = "user" => optional;
        username: Line = "username" => optional;
    }
    /// Keeps public keys in (or out of) a user's authorized_keys.
    CommonSshAuth = "common.ssh.auth", builtin = false {
        username: Account = "username" ["user"] => required;
        absent: bool = "absent" => default(false);
        authname: Line = "authname" ["name"] => optional;
        content: Text = "content" => optional;
        encrypt_algorithm: Line = "encrypt_algorithm" ["enc"] => default("ssh-rsa");
        filename: HomeFile = "filename" ["config"] => default(".ssh/authorized_keys");
    }
    /// Keeps a host's key in (or out of) a known_hosts file, checked against a fingerprint.
    CommonSshKnownHost = "common.ssh.known_host", builtin = false {
        hostname: Line = "hostname" ["name"] => required;
        absent: bool = "absent" => default(false);
        encrypt_algorithm: Line = "encrypt_algorithm" ["enc"] => optional;
        filename: HomeFile = "filename" ["config"] => default(".ssh/known_hosts");
        fingerprint: Line = "fingerprint" => optional;
        port: Port = "port" => optional;
        username: Account = "username" ["user"] => optional;
    }
    /// Sets the system timezone and the hardware-clock UTC flag.
    CommonTimezone = "common.timezone", builtin = false {
        name: Line = "name" => required;
        use_utc: bool = "use-utc" ["utc"] => default(true);
    }
    /// Creates a Python virtualenv, optionally from a requirements file.
    CommonVirtualenv = "common.virtualenv", builtin = false {
        path: PathParam = "path" => required;
        extra_search_dir: Paths = "extra-search-dir" => optional;
        python_bin: Program = "python-bin" ["python"] => optional;
        requirements_file: PathParam = "requirements-file" ["requirements"] => optional;
        system_site_packages: bool = "system-site-packages" => optional;
    }
    /// Manages apt packages.
    LinuxAptPackage = "linux.apt.package", builtin = false {
        name: Dict = "name" ["pkgs"] => required;
        deb_conf_file: LocalFile = "deb-conf-file" ["debconf"] => optional;
        repo: Line = "repo" ["fromrepo"] => optional;
        verify_gpg: bool = "verify-gpg" => default(true);
    }
    /// Adds a Launchpad PPA, optionally with authentication.
    LinuxAptPpa = "linux.apt.ppa", builtin = false {
        name: Line = "name" ["ppa"] => required;
        password: Line = "password" => optional;
        username: Line = "username" => optional;
    }
    /// Writes `/etc/apt/sources.list.d/<name>.list`.
    LinuxAptRepo = "linux.apt.repo", builtin = false {
        content: Text = "content" ["contents"] => required;
        name: Line = "name" => required;
    }
    /// Runs chef-client against a Chef server.
    LinuxChefClient = "linux.chef.client", builtin = false {
        server: Line = "server" => required;
        arguments: Dict = "arguments" => optional;
        client_key: PathParam = "client_key" => optional;
        config: PathParam = "config" => optional;
        version: Line = "version" => optional;
    }
    /// Runs chef-solo using a local config or a remote recipe tarball.
    LinuxChefSolo = "linux.chef.solo", builtin = false {
        arguments: Dict = "arguments" => optional;
        config: PathParam = "config" => optional;
        override_runlist: Line = "override-runlist" => optional;
        recipe_url: Line = "recipe_url" => optional;
        version: Line = "version" => optional;
    }
    /// Runs a shell command, with path-existence guards and a timeout.
    LinuxCmd = "linux.cmd", builtin = false {
        cmd: Text = "cmd" ["name"] => required;
        cwd: PathParam = "cwd" => default("/opt/visualops/tmp/");
        env: Dict = "env" => optional;
        group: Account = "group" => optional;
        if_path_absent: Paths = "if-path-absent" ["unless"] => optional;
        if_path_present: Paths = "if-path-present" ["onlyif"] => optional;
        shell: PathParam = "shell" => default("/bin/sh");
        timeout: u64 = "timeout" => default(600);
        user: Account = "user" => optional;
    }
    /// Manages a user's cron entries.
    LinuxCronjob = "linux.cronjob", builtin = false {
        cmd: Array = "cmd" ["names"] => required;
        user: Account = "user" => default("root");
        day_of_month: CronDayOfMonth = "day-of-month" ["daymonth"] => optional;
        day_of_week: CronDayOfWeek = "day-of-week" ["dayweek"] => optional;
        hour: CronHour = "hour" => optional;
        minute: CronMinute = "minute" => optional;
        month: CronMonth = "month" => optional;
    }
    /// Ensures directories exist (or are absent) with the given owner and mode.
    LinuxDir = "linux.dir", builtin = false {
        path: Paths = "path" ["names"] => required;
        absent: bool = "absent" => default(false);
        group: Account = "group" => optional;
        mode: Mode = "mode" => optional;
        recursive: bool = "recursive" ["recurse"] => default(false);
        user: Account = "user" => optional;
    }
    /// Builds a docker image from a directory that holds a Dockerfile.
    LinuxDockerBuilt = "linux.docker.built", builtin = false {
        path: PathParam = "path" => required;
        tag: Line = "tag" => required;
        containers: Array = "containers" => optional;
        force: bool = "force" => default(false);
        watch: Watch = "watch" => optional;
    }
    /// Composite: writes config files, pulls the image and runs the container(s).
    LinuxDockerDeploy = "linux.docker.deploy", builtin = false {
        container: Line = "container" => required;
        image: Line = "image" => required;
        command: Array = "command" => optional;
        count: u64 = "count" => optional;
        cpu_shares: Line = "cpu_shares" => optional;
        devices: Dict = "devices" => optional;
        email: Line = "email" => optional;
        environment: Dict = "environment" => optional;
        files: PathDict = "files" => optional;
        force: bool = "force" => default(false);
        mem_limit: Line = "mem_limit" => optional;
        password: Line = "password" => optional;
        port_bindings: Dict = "port_bindings" => optional;
        tag: Line = "tag" => default("latest");
        username: Line = "username" => optional;
        volumes: Dict = "volumes" => optional;
        watch: Watch = "watch" => optional;
        ports: Array = "ports" => optional;
        binds: Dict = "binds" => optional;
        links: Dict = "links" => optional;
        publish_all_ports: bool = "publish_all_ports" => optional;
    }
    /// Pulls an image (tag default latest).
    LinuxDockerPulled = "linux.docker.pulled", builtin = false {
        repo: Line = "repo" => required;
        containers: Array = "containers" => optional;
        email: Line = "email" => optional;
        password: Line = "password" => optional;
        tag: Line = "tag" => default("latest");
        username: Line = "username" => optional;
    }
    /// Optionally commits a container, then pushes an image.
    LinuxDockerPushed = "linux.docker.pushed", builtin = false {
        repository: Line = "repository" => required;
        author: Line = "author" => optional;
        container: Line = "container" => optional;
        dep_containers: Array = "dep_containers" => optional;
        email: Line = "email" => optional;
        message: Line = "message" => optional;
        password: Line = "password" => optional;
        tag: Line = "tag" => default("latest");
        username: Line = "username" => optional;
    }
    /// Ensures the named container(s) run from an image.
    LinuxDockerRunning = "linux.docker.running", builtin = false {
        container: Line = "container" => required;
        image: Line = "image" => required;
        command: Array = "command" => optional;
        count: u64 = "count" => optional;
        cpu_shares: Line = "cpu_shares" => optional;
        devices: Dict = "devices" => optional;
        email: Line = "email" => optional;
        environment: Dict = "environment" => optional;
        files: PathDict = "files" => optional;
        force: bool = "force" => default(false);
        mem_limit: Line = "mem_limit" => optional;
        password: Line = "password" => optional;
        port_bindings: Dict = "port_bindings" => optional;
        tag: Line = "tag" => default("latest");
        username: Line = "username" => optional;
        volumes: Dict = "volumes" => optional;
        watch: Watch = "watch" => optional;
        entry_point: Line = "entry_point" => optional;
        ports: Array = "ports" => optional;
        binds: Dict = "binds" => optional;
        links: Dict = "links" => optional;
        publish_all_ports: bool = "publish_all_ports" => optional;
    }
    /// Manages a file's content, owner and mode, or its absence.
    LinuxFile = "linux.file", builtin = false {
        path: PathParam = "path" ["name"] => required;
        absent: bool = "absent" => default(false);
        content: Text = "content" ["contents"] => optional;
        group: Account = "group" => optional;
        mode: Mode = "mode" => optional;
        remote_uri: Line = "remote_uri" => optional;
        user: Account = "user" => optional;
    }
    /// Manages a local group.
    LinuxGroup = "linux.group", builtin = false {
        groupname: AccountName = "groupname" ["name"] => required;
        gid: u64 = "gid" => optional;
        system_group: bool = "system-group" ["system"] => default(false);
    }
    /// Creates an LVM logical volume.
    LinuxLvmLv = "linux.lvm.lv", builtin = false {
        name: Line = "name" => required;
        vg_name: Line = "vg-name" ["vgname"] => required;
        allocation_policy: Line = "allocation-policy" ["alloc"] => optional;
        autobackup: bool = "autobackup" => default(true);
        available: Line = "available" => optional;
        chunk_size: Line = "chunk-size" => optional;
        contiguous: bool = "contiguous" => default(false);
        discards: Line = "discards" => optional;
        ignore_monitoring: bool = "ignore-monitoring" => default(false);
        le_number: Line = "le-number" ["extents"] => optional;
        le_size: Line = "le-size" ["size"] => optional;
        minor_number: Line = "minor-number" => optional;
        mirror_number: Line = "mirror-number" => optional;
        monitor: bool = "monitor" => optional;
        no_udev_sync: bool = "no-udev-sync" => default(false);
        path: Paths = "path" ["pv"] => optional;
        permission: Line = "permission" => optional;
        persistent: bool = "persistent" => optional;
        pool_metadata_size: Line = "pool metadata size" => optional;
        readahead: Line = "readahead" => optional;
        region_size: Line = "region-size" => optional;
        snapshot: Line = "snapshot" => optional;
        stripe_number: Line = "stripe-number" => optional;
        stripe_size: Line = "stripe-size" => optional;
        tag: Line = "tag" => optional;
        thinpool: Line = "thinpool" => optional;
        r#type: Line = "type" => optional;
        virtual_size: Line = "virtual-size" => optional;
        zero: bool = "zero" => default(true);
    }
    /// Initialises LVM physical volumes.
    LinuxLvmPv = "linux.lvm.pv", builtin = false {
        path: Paths = "path" ["names"] => required;
        data_alignment: Line = "data-alignment" => optional;
        data_alignment_offset: Line = "data-alignment-offset" => optional;
        force: bool = "force" => default(false);
        label_sector: Line = "label-sector" => optional;
        metadata_copies: Line = "metadata-copies" => optional;
        metadata_ignore: bool = "metadata-ignore" => default(false);
        metadata_size: Line = "metadata-size" => optional;
        metadata_type: Line = "metadata-type" => default("lvm2");
        no_restore_file: bool = "no-restore-file" => default(true);
        pv_size: Line = "pv-size" => optional;
        restore_file: Line = "restore-file" => optional;
        uuid: Line = "uuid" => optional;
        zero: bool = "zero" => default(true);
    }
    /// Creates an LVM volume group.
    LinuxLvmVg = "linux.lvm.vg", builtin = false {
        name: Line = "name" => required;
        path: Paths = "path" ["devices"] => required;
        allocation_policy: Line = "allocation-policy" ["alloc"] => optional;
        autobackup: bool = "autobackup" => default(true);
        clustered: bool = "clustered" => default(false);
        max_lv_number: Line = "max-lv-number" => optional;
        max_pv_number: Line = "max-pv-number" => optional;
        metadata_copies: Line = "metadata-copies" => optional;
        metadata_type: Line = "metadata-type" => default("lvm2");
        pe_size: Line = "pe-size" => default("4m");
        tag: Line = "tag" => optional;
    }
    /// Configures and runs a Mesos master: ZooKeeper, mesos-master and optionally Marathon.
    LinuxMesosMaster = "linux.mesos.master", builtin = false {
        cluster_name: Line = "cluster_name" => required;
        master_ip: Line = "master_ip" => required;
        masters_addresses: Dict = "masters_addresses" => required;
        server_id: Line = "server_id" => required;
        framework: Array = "framework" => optional;
        hostname: Line = "hostname" => optional;
    }
    /// Configures and runs a Mesos slave plus the haproxy-marathon bridge.
    LinuxMesosSlave = "linux.mesos.slave", builtin = false {
        attributes: Dict = "attributes" => required;
        masters_addresses: Dict = "masters_addresses" => required;
        slave_ip: Line = "slave_ip" => required;
    }
    /// Creates a filesystem on a device.
    LinuxMkfs = "linux.mkfs", builtin = false {
        device: PathParam = "device" => required;
        fstype: Line = "fstype" => required;
        label: Line = "label" => optional;
    }
    /// Mounts a device, optionally persisting it in /etc/fstab.
    LinuxMount = "linux.mount", builtin = false {
        device: Line = "device" ["dev"] => required;
        filesystem: Line = "filesystem" ["fstype"] => required;
        path: PathParam = "path" ["name"] => required;
        dump: u64 = "dump" => default(0);
        fstab: bool = "fstab" ["persist"] => default(false);
        opts: Line = "opts" => optional;
        pass: u64 = "pass" ["pass-num"] => default(0);
    }
    /// Runs the Puppet agent against a server.
    LinuxPuppetAgent = "linux.puppet.agent", builtin = false {
        server: Line = "server" => required;
        arguments: Dict = "arguments" => optional;
        version: Line = "version" => optional;
    }
    /// Applies local Puppet manifests.
    LinuxPuppetApply = "linux.puppet.apply", builtin = false {
        manifests: Paths = "manifests" => required;
        arguments: Dict = "arguments" => optional;
        version: Line = "version" => optional;
    }
    /// Runs a Puppet round with free-form arguments.
    LinuxPuppetRun = "linux.puppet.run", builtin = false {
        arguments: Dict = "arguments" => optional;
        version: Line = "version" => optional;
    }
    /// Sets SELinux booleans and the SELinux mode.
    LinuxSelinux = "linux.selinux", builtin = false {
        boolean: Dict = "boolean" => optional;
        mode: Line = "mode" => optional;
        persist: bool = "persist" => default(true);
    }
    /// Creates an mdadm software RAID array.
    LinuxRaid = "linux.raid", builtin = false {
        device_name: PathParam = "device-name" ["name"] => required;
        devices: Paths = "devices" => required;
        level: Line = "level" => required;
        arguments: Dict = "arguments" => optional;
    }
    /// Imports an RPM GPG key.
    LinuxRpmKey = "linux.rpm.key", builtin = false {
        path: KeySource = "path" => required;
    }
    /// Keeps services running; when a watched file changes, reloads, restarts or runs a command.
    LinuxService = "linux.service", builtin = false {
        name: Dict = "name" ["names"] => required;
        watch: Watch = "watch" => optional;
    }
    /// Keeps supervisord and the named programs running; restarts them when watched files change.
    LinuxSupervisord = "linux.supervisord", builtin = false {
        config: PathParam = "config" ["conf-file"] => required;
        name: Array = "name" ["names"] => required;
        watch: Watch = "watch" => optional;
    }
    /// Manages a symbolic link.
    LinuxSymlink = "linux.symlink", builtin = false {
        source: PathParam = "source" => required;
        target: PathParam = "target" => required;
        absent: bool = "absent" => default(false);
        group: Account = "group" => optional;
        user: Account = "user" => optional;
        mode: Mode = "mode" => optional;
    }
    /// Manages a local user.
    LinuxUser = "linux.user", builtin = false {
        username: AccountName = "username" ["name"] => required;
        password: Line = "password" => optional;
        fullname: Line = "fullname" => optional;
        gid: u64 = "gid" => optional;
        groups: AccountNames = "groups" => optional;
        home: PathParam = "home" => optional;
        no_login: bool = "no-login" ["nologin"] => default(false);
        system_account: bool = "system-account" ["system"] => default(false);
        uid: u64 = "uid" => optional;
        shell: PathParam = "shell" => optional;
    }
    /// Manages yum packages.
    LinuxYumPackage = "linux.yum.package", builtin = false {
        name: Dict = "name" ["pkgs"] => required;
        repo: Line = "repo" ["fromrepo"] => optional;
        verify_gpg: bool = "verify-gpg" => default(true);
    }
    /// Writes `/etc/yum.repos.d/<name>.repo` or installs a repo-release RPM.
    LinuxYumRepo = "linux.yum.repo", builtin = false {
        name: Line = "name" => required;
        content: Text = "content" ["contents"] => optional;
        rpm_url: Line = "rpm-url" => optional;
        rpm_key: Line = "rpm-key" => optional;
    }
    /// A comment only; does nothing.
    MetaComment = "meta.comment", builtin = true {
        comment: Text = "comment" => optional;
    }
    /// Blocks this host until the named remote state(s) are done; without `state`,
    /// until the backend pushes a `State` carrying this state's own id (the original's
    /// only rule).
    MetaWait = "meta.wait", builtin = true {
        state: StateRefs = "state" => optional;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn there_are_48_modules_with_unique_names() {
        assert_eq!(MODULES.len(), 48);
        let mut names: Vec<_> = MODULES.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 48);
        assert!(MODULES.iter().all(|m| !m.summary.is_empty()));
    }

    /// Every default in the table parses as its own type, and a state with only its
    /// required parameters (given as strings or lists) is accepted.
    #[test]
    fn every_module_parses_with_only_required_parameters() {
        for m in MODULES {
            let mut params = Map::new();
            for p in m.params.iter().filter(|p| p.presence == Presence::Required) {
                let v = match p.kind {
                    Kind::Dict => json!([{"key": "k", "value": "v"}]),
                    Kind::Array if m.name == "linux.supervisord" => json!(["app"]),
                    Kind::Array => json!(["/tmp/x"]),
                    Kind::State => json!("@{host.state-1}"),
                    Kind::Integer => json!("1"),
                    Kind::Mode => json!("0644"),
                    Kind::Bool => json!(true),
                    _ if p.name == "fstype" => json!("ext4"),
                    _ if p.name == "level" => json!("raid1"),
                    _ if ["username", "groupname"].contains(&p.name) => json!("alice"),
                    _ if m.name == "common.timezone" => json!("Europe/Paris"),
                    _ if p.name == "hostname" || p.name == "url" => json!("example.org"),
                    _ if m.name == "linux.apt.repo" || m.name == "linux.yum.repo" => json!("local"),
                    _ => json!("/tmp/x"),
                };
                params.insert(p.name.to_string(), v);
            }
            // Modules whose parameters are all optional, one of which is needed.
            match m.name {
                "common.ssh.auth" => drop(params.insert("content".into(), json!("ssh-ed25519 AAAAC3Nz k"))),
                "linux.selinux" => drop(params.insert("mode".into(), json!("permissive"))),
                "common.ssh.known_host" => drop(params.insert("username".into(), json!("alice"))),
                _ => {}
            }
            let parsed = parse_state(m.name, &Value::Object(params)).unwrap_or_else(|e| panic!("{}: {e}", m.name));
            assert_eq!(parsed.params.name(), m.name);
            assert!(parsed.warnings.is_empty(), "{}: {:?}", m.name, parsed.warnings);
            // The request format round-trips.
            let text = serde_json::to_string(&parsed.params).unwrap();
            let back: ModuleParams = serde_json::from_str(&text).unwrap();
            assert_eq!(back, parsed.params);
        }
    }

    #[test]
    fn missing_required_parameter_is_named() {
        for m in MODULES {
            for p in m.params.iter().filter(|p| p.presence == Presence::Required) {
                let err = parse_state(m.name, &json!({})).unwrap_err();
                assert!(matches!(err, CatalogueError::Missing { .. }), "{}: {err}", m.name);
                let _ = p;
            }
        }
        let err = parse_state("linux.file", &json!({"mode": "0600"})).unwrap_err();
        assert_eq!(err.to_string(), "linux.file: missing required parameter \"path\"");
    }

    #[test]
    fn wrong_type_names_parameter_expected_and_received() {
        let err = parse_state("linux.file", &json!({"path": "/x", "mode": "rwx"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "linux.file: parameter \"mode\": expected an octal mode such as \"0644\", got string \"rwx\""
        );
        let err = parse_state("linux.dir", &json!({"path": ["/x"], "absent": "perhaps"})).unwrap_err();
        assert!(err.to_string().contains("\"absent\": expected a boolean"), "{err}");
    }

    #[test]
    fn unknown_module_and_parameter() {
        assert_eq!(
            parse_state("linux.teleport", &json!({})).unwrap_err(),
            CatalogueError::UnknownModule("linux.teleport".into())
        );
        let p = parse_state("linux.file", &json!({"path": "/x", "colour": "blue"})).unwrap();
        assert_eq!(p.warnings, vec!["unknown parameter \"colour\" ignored by linux.file".to_string()]);
    }

    /// A name given in two spellings counts once, with the value given last, whether the
    /// module takes it or not; names left over are reported as given, each once, in the
    /// order of their normalised names.
    #[test]
    fn a_name_given_in_two_spellings_counts_once_with_its_last_value() {
        let raw = json!({"Path": "/a", "zz_top": 1, " path ": "/b", "Colour": "red", "colour": "blue", "ZZ-top": 2, "a b": 3});
        let p = parse_state("linux.file", &raw).unwrap();
        let ModuleParams::LinuxFile(f) = &p.params else { panic!("{:?}", p.params) };
        assert_eq!(f.path.0, "/b");
        let warned: Vec<&str> = p.warnings.iter().map(|w| w.split('"').nth(1).unwrap()).collect();
        assert_eq!(warned, ["a b", "colour", "ZZ-top"]);
        // A null value is a name not given: the other spelling's value stands.
        let p = parse_state("linux.file", &json!({"path": "/a", "PATH": null})).unwrap();
        let ModuleParams::LinuxFile(f) = &p.params else { panic!("{:?}", p.params) };
        assert_eq!((f.path.0.as_str(), p.warnings.len()), ("/a", 0));
        // The helper's reading names the first left over the same way.
        let err = parse_params("linux.file", &json!({"path": "/a", "b_b": 1, "A-a": 2})).unwrap_err();
        assert!(err.to_string().contains("A-a"), "{err}");
    }

    #[test]
    fn defaults_and_older_spellings() {
        let p = parse_state("linux.cmd", &json!({"cmd": "true"})).unwrap();
        let ModuleParams::LinuxCmd(c) = p.params else { panic!() };
        assert_eq!((c.timeout, c.shell.0.as_str(), c.cwd.0.as_str()), (600, "/bin/sh", "/opt/visualops/tmp/"));

        let p = parse_state(
            "linux.apt.package",
            &json!({"name": [{"key": "nginx", "value": "latest"}], "fromrepo": "main", "verify_gpg": "no", "debconf": "/x"}),
        )
        .unwrap();
        let ModuleParams::LinuxAptPackage(a) = p.params else { panic!() };
        assert_eq!(a.repo.as_deref(), Some("main"));
        assert!(!a.verify_gpg);
        assert_eq!(a.deb_conf_file.map(|f| f.to_string()).as_deref(), Some("/x"));
        assert!(p.warnings.is_empty());

        let p = parse_state("common.timezone", &json!({"name": "UTC", "use_utc": false})).unwrap();
        let ModuleParams::CommonTimezone(t) = p.params else { panic!() };
        assert!(!t.use_utc);

        let p = parse_state(
            "linux.mount",
            &json!({"dev": "/dev/x", "filesystem": "ext4", "path": "/m", "opts": ["rw", "noatime"], "fstab": "False"}),
        )
        .unwrap();
        let ModuleParams::LinuxMount(m) = p.params else { panic!() };
        assert_eq!(m.opts.as_deref(), Some("rw,noatime"));
        assert!(!m.fstab);

        let p = parse_state(
            "linux.lvm.lv",
            &json!({"name": "lv", "vg-name": "vg", "pool-metadata-size": "4m", "PV size": "x"}),
        )
        .unwrap();
        let ModuleParams::LinuxLvmLv(lv) = p.params else { panic!() };
        assert_eq!(lv.pool_metadata_size.as_deref(), Some("4m"));
        assert_eq!(p.warnings.len(), 1);

        let p = parse_state("linux.service", &json!({"name": ["crond"], "watch": true})).unwrap();
        let ModuleParams::LinuxService(s) = p.params else { panic!() };
        assert_eq!(s.watch, Some(Watch::EveryRound));
        assert_eq!(s.name.0[0].key, "crond");
    }

    #[test]
    fn blank_optional_values_are_not_given() {
        let p = parse_state(
            "linux.user",
            &json!({"username": "u", "password": "$6$x", "uid": "", "gid": "", "no-login": ""}),
        )
        .unwrap();
        let ModuleParams::LinuxUser(u) = p.params else { panic!() };
        assert_eq!((u.uid, u.gid, u.no_login), (None, None, false));
        let err = parse_state("linux.file", &json!({"path": ""})).unwrap_err();
        assert!(matches!(err, CatalogueError::Missing { .. }));
    }

    #[test]
    fn placeholders_render_like_safe_substitute() {
        let p = parse_state("linux.cmd", &json!({"cmd": "echo $cwd ${shell} $HOME $$ $", "cwd": "/srv"})).unwrap();
        let ModuleParams::LinuxCmd(c) = p.params else { panic!() };
        assert_eq!(c.cmd.0, "echo /srv /bin/sh $HOME $ $".replace("/bin/sh", "${shell}"));
        let p = parse_state("linux.file", &json!({"path": "/etc/$name.conf", "name": "ignored"})).unwrap();
        // Every parameter is a placeholder's value, even one the module then ignores (an
        // alias shadowed by its main name): the path is rendered from it, and the alias
        // is reported.
        let ModuleParams::LinuxFile(f) = &p.params else { panic!("{:?}", p.params) };
        assert_eq!(f.path.0, "/etc/ignored.conf");
        assert_eq!(p.warnings, vec!["unknown parameter \"name\" ignored by linux.file".to_string()]);
    }

    #[test]
    fn semantic_checks() {
        let bad = parse_state("linux.cronjob", &json!({"cmd": ["x"], "minute": "61"})).unwrap_err();
        assert!(bad.to_string().contains("minute"), "{bad}");
        assert!(parse_state("linux.cronjob", &json!({"cmd": ["x"], "minute": "*/5", "hour": "1-3,7"})).is_ok());
        assert!(parse_state("linux.cronjob", &json!({"cmd": [""]})).unwrap_err().to_string().contains("empty command"));
        assert!(parse_state("linux.cronjob", &json!({"cmd": ["  "]})).is_err());
        assert!(parse_state("linux.mkfs", &json!({"device": "/dev/x", "fstype": "btrfs"})).is_ok());
        assert!(parse_state("linux.mkfs", &json!({"device": "/dev/x", "fstype": "ext4 -x"})).is_err());
        assert!(parse_state("linux.service", &json!({"name": []})).is_err());
    }

    /// The helper's decoding of an `Apply` body runs the catalogue: what `opsagent
    /// check` refuses cannot be deserialised either, and the message names the parameter.
    #[test]
    fn deserialising_params_runs_every_check() {
        let decode = |module: &str, params: Value| {
            serde_json::from_value::<ModuleParams>(json!({"module": module, "params": params}))
                .map_err(|e| e.to_string())
        };
        let hostile = [
            ("linux.cronjob", json!({"cmd": ["true"], "user": "root", "minute": "* * * * * echo x\n0"}), "minute"),
            ("linux.cronjob", json!({"cmd": ["true"], "user": "root\nx"}), "user"),
            ("linux.file", json!({"path": "/tmp/x", "mode": "77777"}), "mode"),
            ("linux.file", json!({"path": "/tmp/x", "mode": 32767}), "mode"),
            ("linux.file", json!({"path": "tmp/x"}), "path"),
            ("linux.service", json!({"name": [{"key": "../../x"}]}), "name"),
            ("linux.user", json!({"username": "a:0:0", "password": "x"}), "username"),
            ("linux.file", json!({"path": "/tmp/x", "colour": "blue"}), "colour"),
        ];
        for (module, params, param) in hostile {
            let err = decode(module, params.clone()).expect_err(&format!("{module} {params}"));
            assert!(err.contains(&format!("parameter \"{param}\"")), "{module} {params}: {err}");
        }
        // What the daemon serialises reads back the same, a literal `$` included.
        let parsed = parse_state("linux.cmd", &json!({"cmd": "echo $$cwd", "cwd": "/srv"})).unwrap().params;
        let back = decode("linux.cmd", serde_json::to_value(&parsed).unwrap()["params"].clone()).unwrap();
        assert_eq!(back, parsed);
        let ModuleParams::LinuxCmd(c) = back else { panic!() };
        assert_eq!(c.cmd.0, "echo $cwd");
    }

    /// Paths, path lists, accounts, cron fields and ports are typed parameters: the one
    /// decode (daemon and helper) refuses a bad value naming the parameter, and hands
    /// the module the validated value.
    #[test]
    fn typed_parameters_are_validated_at_decode() {
        let bad = [
            // Paths: relative, climbing, a newline, a tab.
            ("common.git", json!({"path": "srv/app", "repo": "r"}), "path"),
            ("common.archive", json!({"path": "/srv/../etc", "source": "https://x/a.tgz"}), "path"),
            ("linux.symlink", json!({"source": "/a\nb", "target": "/l"}), "source"),
            ("linux.mkfs", json!({"device": "/dev/x\ty", "fstype": "ext4"}), "device"),
            ("common.git", json!({"path": "/srv", "repo": "r", "ssh-key-file": "id_rsa"}), "ssh-key-file"),
            ("linux.chef.client", json!({"server": "s", "client_key": "k.pem"}), "client_key"),
            // Path lists: one bad item refuses the list.
            ("linux.cmd", json!({"cmd": "x", "if-path-present": ["/ok", "rel"]}), "if-path-present"),
            ("linux.lvm.pv", json!({"path": ["/dev/xvdb", "xvdc"]}), "path"),
            ("linux.puppet.apply", json!({"manifests": ["/etc/site.pp", "../x.pp"]}), "manifests"),
            ("common.virtualenv", json!({"path": "/v", "extra-search-dir": ["w"]}), "extra-search-dir"),
            // Accounts: a colon, a leading dash, a newline (before trimming), a blank.
            ("linux.dir", json!({"path": ["/d"], "user": "root:0"}), "user"),
            ("linux.symlink", json!({"source": "/a", "target": "/l", "group": "-g0"}), "group"),
            ("linux.cmd", json!({"cmd": "x", "user": "root\n"}), "user"),
            ("common.ssh.auth", json!({"username": "a b", "content": "k"}), "username"),
            // Cron fields: a second crontab line, blanks inside, out of range.
            ("linux.cronjob", json!({"cmd": ["x"], "minute": "* * * * * echo injected\n0"}), "minute"),
            ("linux.cronjob", json!({"cmd": ["x"], "hour": "1 2"}), "hour"),
            ("linux.cronjob", json!({"cmd": ["x"], "dayweek": "8"}), "day-of-week"),
            // Ports.
            ("common.ssh.known_host", json!({"hostname": "h", "username": "u", "port": 70000}), "port"),
            ("common.ssh.known_host", json!({"hostname": "h", "username": "u", "port": "0"}), "port"),
            // Account names, group lists, home and shell of linux.user/linux.group.
            ("linux.user", json!({"username": "-obad"}), "username"),
            ("linux.user", json!({"username": "u", "groups": ["adm", "sudo\nroot"]}), "groups"),
            ("linux.user", json!({"username": "u", "shell": "bin/sh"}), "shell"),
            ("linux.user", json!({"username": "u", "home": "/home/../root"}), "home"),
            ("linux.group", json!({"groupname": "g\n"}), "groupname"),
            // Watch lists and docker `files` keys.
            ("linux.service", json!({"name": ["x"], "watch": ["/ok", "rel"]}), "watch"),
            ("linux.supervisord", json!({"config": "/c", "name": ["a"], "watch": ["/a\nb"]}), "watch"),
            ("linux.docker.built", json!({"path": "/b", "tag": "t", "watch": ["/a/../b"]}), "watch"),
            ("linux.docker.running", json!({"container": "c", "image": "i", "files": {"app.yml": "/h"}}), "files"),
            ("linux.docker.deploy", json!({"container": "c", "image": "i", "files": {"/": "x"}}), "files"),
            // Local files and key sources: other URL schemes, relative paths.
            ("linux.apt.package", json!({"name": ["x"], "deb-conf-file": "ftp://h/sel"}), "deb-conf-file"),
            ("linux.apt.package", json!({"name": ["x"], "deb-conf-file": "file://etc/sel"}), "deb-conf-file"),
            ("linux.rpm.key", json!({"path": "gopher://h/KEY"}), "path"),
            ("linux.rpm.key", json!({"path": "-KEY"}), "path"),
            // Programs and files in a home.
            ("common.virtualenv", json!({"path": "/v", "python-bin": "-c"}), "python-bin"),
            ("common.virtualenv", json!({"path": "/v", "python-bin": "bin/python"}), "python-bin"),
            ("common.ssh.auth", json!({"username": "u", "content": "k", "filename": "../../etc/x"}), "filename"),
            ("common.ssh.known_host", json!({"hostname": "h", "username": "u", "filename": "-f"}), "filename"),
        ];
        for (module, params, param) in bad {
            let err = parse_state(module, &params).expect_err(&format!("{module} {params}"));
            assert!(
                matches!(&err, CatalogueError::Invalid { param: p, .. } | CatalogueError::WrongType { param: p, .. } if p == param),
                "{module} {params}: {err}"
            );
            let wire = serde_json::from_value::<ModuleParams>(json!({"module": module, "params": params}));
            assert!(wire.unwrap_err().to_string().contains(&format!("parameter \"{param}\"")), "{module}");
        }

        let p = parse_state(
            "linux.cmd",
            &json!({"cmd": "x", "cwd": " /srv//app/ ", "user": " www-data ", "if-path-absent": ["/a/./b", " ", "/c"]}),
        )
        .unwrap();
        let ModuleParams::LinuxCmd(c) = &p.params else { panic!() };
        assert_eq!((c.cwd.0.as_str(), c.cwd.to_string()), ("/srv//app/", "/srv/app".to_string()));
        assert_eq!(c.user.as_deref(), Some("www-data"));
        let absent: Vec<String> = c.if_path_absent.iter().flat_map(|a| a.iter()).map(ToString::to_string).collect();
        assert_eq!(absent, ["/a/b", "/c"]);
        // What the daemon sends is what it checked: the helper reads it back the same.
        let back: ModuleParams = serde_json::from_value(serde_json::to_value(&p.params).unwrap()).unwrap();
        assert_eq!(back, p.params);

        let p =
            parse_state("linux.cronjob", &json!({"cmd": ["x"], "minute": "0,30", "dayweek": "mon-fri", "hour": ""}))
                .unwrap();
        let ModuleParams::LinuxCronjob(j) = &p.params else { panic!() };
        assert_eq!(j.fields().map(|(_, v)| v), [Some("0,30"), None, None, None, Some("1-5")]);
        assert_eq!(j.user.as_str(), "root");

        let p =
            parse_state("common.ssh.known_host", &json!({"hostname": "h", "username": "u", "port": "2222"})).unwrap();
        let ModuleParams::CommonSshKnownHost(k) = &p.params else { panic!() };
        assert_eq!(k.port, Some(Port(2222)));
        // Blank optional typed values are "not given", as for the other non-text types.
        let p = parse_state("linux.file", &json!({"path": "/f", "user": "", "group": " "})).unwrap();
        let ModuleParams::LinuxFile(f) = &p.params else { panic!() };
        assert_eq!((f.user.as_ref(), f.group.as_ref()), (None, None));
    }

    #[test]
    fn values_have_size_caps() {
        let big = "x".repeat(crate::param_types::MAX_LINE_BYTES + 1);
        let err = parse_state("linux.cronjob", &json!({"cmd": ["true"], "hour": big})).unwrap_err();
        assert!(err.to_string().contains("\"hour\"") && err.to_string().contains("longer than"), "{err}");
        let content = "x".repeat(crate::param_types::MAX_TEXT_BYTES + 1);
        let err = parse_state("linux.file", &json!({"path": "/x", "content": content})).unwrap_err();
        assert!(err.to_string().contains("\"content\"") && err.to_string().contains("longer than"), "{err}");
        let many: Vec<String> = (0..=crate::param_types::MAX_ITEMS).map(|i| format!("/d{i}")).collect();
        let err = parse_state("linux.dir", &json!({"path": many})).unwrap_err();
        assert!(err.to_string().contains("\"path\""), "{err}");
    }

    #[test]
    fn wait_references() {
        let p = parse_state("meta.wait", &json!({"state": "@{web.state-3}"})).unwrap();
        assert!(p.params.is_builtin());
        let ModuleParams::MetaWait(w) = p.params else { panic!() };
        assert_eq!(w.state.unwrap().0[0].state, "state-3");
        // The original waited for a State push carrying the wait's own id and never
        // read `state`: without it (or blank) the wait is still valid.
        for params in [json!({}), json!({"state": ""}), json!(null)] {
            let ModuleParams::MetaWait(w) = parse_state("meta.wait", &params).unwrap().params else { panic!() };
            assert!(w.state.is_none(), "{params}");
        }
    }
}
