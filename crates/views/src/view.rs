//! Parsing, validation and compilation of a ViewDefinition (JSON) into a [`View`].

use fhirpath::Expression;
use serde_json::{Map, Value as Json};

use crate::error::{Reason, ViewError};
use crate::functions;
use crate::value::ValueKind;

/// An output column, in output order.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// The FHIRPath that fills it.
    pub path: String,
    /// The declared FHIR type (`id`, `boolean`, `dateTime`, `HumanName`, …), if any.
    pub ty: Option<String>,
    /// `collection: true`: the cell holds every value (a [`crate::Value::Collection`]).
    pub collection: bool,
    pub description: Option<String>,
}

impl Column {
    /// The kind of value the column holds, from its declared type (`String` when undeclared).
    pub fn kind(&self) -> ValueKind {
        self.ty
            .as_deref()
            .map(ValueKind::of_fhir_type)
            .unwrap_or(ValueKind::String)
    }
}

/// A compiled ViewDefinition: every path compiled once; `Send + Sync`, evaluate often.
#[derive(Debug)]
pub struct View {
    pub(crate) name: Option<String>,
    pub(crate) resource: String,
    pub(crate) constants: Vec<Constant>,
    pub(crate) wheres: Vec<(String, Expression)>,
    pub(crate) root: Select,
    pub(crate) columns: Vec<Column>,
    pub(crate) uses_row_index: bool,
}

/// A constant: its name and its value as a detached FHIR primitive of its declared type.
#[derive(Debug)]
pub(crate) struct Constant {
    pub name: String,
    pub fhir_type: &'static str,
    pub value: Json,
}

#[derive(Debug)]
pub(crate) enum Iteration {
    None,
    ForEach(Expression),
    ForEachOrNull(Expression),
    Repeat(Vec<Expression>),
}

#[derive(Debug)]
pub(crate) struct ColumnExpr {
    pub name: String,
    pub element: String,
    pub expr: Expression,
    pub collection: bool,
}

/// A selection structure. Its rows cover a contiguous run of output columns: its own columns,
/// then its nested selects' in order, then its unionAll's.
#[derive(Debug)]
pub(crate) struct Select {
    pub element: String,
    pub iteration: Iteration,
    pub columns: Vec<ColumnExpr>,
    pub selects: Vec<Select>,
    pub union: Vec<Select>,
    /// The row `forEachOrNull` emits for an empty collection: null, or 0 for `%rowIndex` columns.
    pub null_row: Vec<crate::Value>,
}

const VIEW_KEYS: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "implicitRules",
    "language",
    "text",
    "contained",
    "extension",
    "modifierExtension",
    "url",
    "identifier",
    "name",
    "title",
    "version",
    "meta",
    "status",
    "experimental",
    "publisher",
    "contact",
    "description",
    "useContext",
    "copyright",
    "resource",
    "fhirVersion",
    "profile",
    "constant",
    "select",
    "where",
];
const SELECT_KEYS: &[&str] = &[
    "id",
    "extension",
    "modifierExtension",
    "column",
    "select",
    "forEach",
    "forEachOrNull",
    "repeat",
    "unionAll",
];
const COLUMN_KEYS: &[&str] = &[
    "id",
    "extension",
    "modifierExtension",
    "name",
    "path",
    "description",
    "collection",
    "type",
    "tag",
];

/// Variables every path may read besides the constants.
const BUILTIN_VARIABLES: &[&str] = &[
    "rowIndex",
    "resource",
    "rootResource",
    "context",
    "ucum",
    "sct",
    "loinc",
];

impl View {
    /// Parses, validates and compiles a ViewDefinition given as JSON text.
    pub fn from_json_str(text: &str) -> Result<View, ViewError> {
        let json: Json = serde_json::from_str(text)
            .map_err(|e| ViewError::new("", Reason::Json(e.to_string())))?;
        View::compile(&json)
    }

    /// Parses, validates and compiles a ViewDefinition.
    pub fn compile(json: &Json) -> Result<View, ViewError> {
        let obj = object(json, "")?;
        check_keys(obj, VIEW_KEYS, "")?;
        if let Some(rt) = obj.get("resourceType")
            && rt.as_str() != Some("ViewDefinition")
        {
            return Err(ViewError::new(
                "resourceType",
                Reason::WrongType("'ViewDefinition'"),
            ));
        }
        let resource = string(obj, "resource", "")?
            .ok_or_else(|| ViewError::new("resource", Reason::Missing))?;
        if !fhir_model::r4()
            .resource_types()
            .iter()
            .any(|t| t == resource)
        {
            return Err(ViewError::new(
                "resource",
                Reason::UnknownResourceType(resource.to_string()),
            ));
        }
        let name = string(obj, "name", "")?.map(str::to_string);
        // The spec's sql-name rule; writers also use the name for table and file names.
        if let Some(n) = &name
            && !valid_name(n)
        {
            return Err(ViewError::new("name", Reason::InvalidName(n.clone())));
        }
        let constants = constants(obj)?;
        let mut cx = Compiler {
            constants: constants.iter().map(|c| c.name.clone()).collect(),
            uses_row_index: false,
        };
        let mut wheres = Vec::new();
        for (i, w) in array(obj, "where", "")?.iter().enumerate() {
            let el = format!("where[{i}]");
            let wo = object(w, &el)?;
            check_keys(wo, &["id", "extension", "path", "description"], &el)?;
            let path = string(wo, "path", &el)?
                .ok_or_else(|| ViewError::new(format!("{el}.path"), Reason::Missing))?;
            wheres.push((el.clone(), cx.path(path, &format!("{el}.path"))?));
        }
        let selects = array(obj, "select", "")?;
        if selects.is_empty() {
            return Err(ViewError::new("select", Reason::Missing));
        }
        let mut columns = Vec::new();
        let mut root_selects = Vec::new();
        for (i, s) in selects.iter().enumerate() {
            let (sel, cols) = cx.select(s, &format!("select[{i}]"), &columns)?;
            for c in cols {
                push_column(&mut columns, c, &format!("select[{i}]"))?;
            }
            root_selects.push(sel);
        }
        let root = Select {
            element: String::new(),
            iteration: Iteration::None,
            columns: Vec::new(),
            selects: root_selects,
            union: Vec::new(),
            null_row: Vec::new(),
        };
        Ok(View {
            name,
            resource: resource.to_string(),
            constants,
            wheres,
            root,
            columns,
            uses_row_index: cx.uses_row_index,
        })
    }

    /// The resource type the view reads; resources of other types give no rows.
    pub fn resource_type(&self) -> &str {
        &self.resource
    }

    /// The view's `name`, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The output columns, in output order.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }
}

struct Compiler {
    constants: Vec<String>,
    uses_row_index: bool,
}

impl Compiler {
    fn path(&mut self, src: &str, element: &str) -> Result<Expression, ViewError> {
        let expr = Expression::compile_with(src, functions::registry()).map_err(|e| {
            let reason = match e.found.strip_prefix("unknown function '") {
                Some(rest) => Reason::UnknownFunction {
                    function: rest.trim_end_matches('\'').to_string(),
                    path: src.to_string(),
                },
                None => Reason::InvalidPath {
                    path: src.to_string(),
                    source: e,
                },
            };
            ViewError::new(element, reason)
        })?;
        for v in expr.variables() {
            if v == "rowIndex" {
                self.uses_row_index = true;
            }
            let known = self.constants.iter().any(|c| c == v)
                || BUILTIN_VARIABLES.contains(&v)
                || v.starts_with("vs-")
                || v.starts_with("ext-");
            if !known {
                return Err(ViewError::new(
                    element,
                    Reason::UndefinedConstant {
                        name: v.to_string(),
                        path: src.to_string(),
                    },
                ));
            }
        }
        Ok(expr)
    }

    /// Compiles one selection structure; returns it with the columns it produces (in order),
    /// checking names against `prior` (the columns defined before it) as the spec's
    /// `ValidateColumns` does.
    fn select(
        &mut self,
        json: &Json,
        el: &str,
        prior: &[Column],
    ) -> Result<(Select, Vec<Column>), ViewError> {
        let obj = object(json, el)?;
        check_keys(obj, SELECT_KEYS, el)?;
        let for_each = string(obj, "forEach", el)?;
        let for_each_or_null = string(obj, "forEachOrNull", el)?;
        let repeat = match obj.get("repeat") {
            None => None,
            Some(_) => Some(array(obj, "repeat", el)?),
        };
        let iterations = [
            for_each.is_some(),
            for_each_or_null.is_some(),
            repeat.is_some(),
        ];
        if iterations.iter().filter(|b| **b).count() > 1 {
            return Err(ViewError::new(el, Reason::ConflictingIteration));
        }
        let iteration = if let Some(p) = for_each {
            Iteration::ForEach(self.path(p, &format!("{el}.forEach"))?)
        } else if let Some(p) = for_each_or_null {
            Iteration::ForEachOrNull(self.path(p, &format!("{el}.forEachOrNull"))?)
        } else if let Some(paths) = repeat {
            if paths.is_empty() {
                return Err(ViewError::new(format!("{el}.repeat"), Reason::Empty));
            }
            let mut exprs = Vec::new();
            for (i, p) in paths.iter().enumerate() {
                let pel = format!("{el}.repeat[{i}]");
                let src = p
                    .as_str()
                    .ok_or_else(|| ViewError::new(&pel, Reason::WrongType("a string")))?;
                exprs.push(self.path(src, &pel)?);
            }
            Iteration::Repeat(exprs)
        } else {
            Iteration::None
        };

        // Ret starts as the prior columns; what this structure adds is returned.
        let mut ret: Vec<Column> = prior.to_vec();
        let mut own: Vec<Column> = Vec::new();
        let mut columns = Vec::new();
        for (i, c) in array(obj, "column", el)?.iter().enumerate() {
            let cel = format!("{el}.column[{i}]");
            let co = object(c, &cel)?;
            check_keys(co, COLUMN_KEYS, &cel)?;
            let name = string(co, "name", &cel)?
                .ok_or_else(|| ViewError::new(format!("{cel}.name"), Reason::Missing))?;
            if !valid_name(name) {
                return Err(ViewError::new(
                    format!("{cel}.name"),
                    Reason::InvalidName(name.to_string()),
                ));
            }
            let path = string(co, "path", &cel)?
                .ok_or_else(|| ViewError::new(format!("{cel}.path"), Reason::Missing))?;
            let ty = string(co, "type", &cel)?;
            if let Some(t) = ty
                && t != "integer64"
                && fhir_model::r4().type_def(t).is_none()
            {
                return Err(ViewError::new(
                    format!("{cel}.type"),
                    Reason::UnknownType(t.to_string()),
                ));
            }
            let collection = match co.get("collection") {
                None => false,
                Some(Json::Bool(b)) => *b,
                Some(_) => {
                    return Err(ViewError::new(
                        format!("{cel}.collection"),
                        Reason::WrongType("a boolean"),
                    ));
                }
            };
            if let Some(tags) = co.get("tag")
                && !tags.is_array()
            {
                return Err(ViewError::new(
                    format!("{cel}.tag"),
                    Reason::WrongType("an array"),
                ));
            }
            let expr = self.path(path, &format!("{cel}.path"))?;
            let column = Column {
                name: name.to_string(),
                path: path.to_string(),
                ty: ty.map(str::to_string),
                collection,
                description: string(co, "description", &cel)?.map(str::to_string),
            };
            push_column(&mut ret, column.clone(), &cel)?;
            own.push(column);
            columns.push(ColumnExpr {
                name: name.to_string(),
                element: cel,
                expr,
                collection,
            });
        }
        let mut selects = Vec::new();
        for (i, s) in array(obj, "select", el)?.iter().enumerate() {
            let sel_el = format!("{el}.select[{i}]");
            let (sel, cols) = self.select(s, &sel_el, &ret)?;
            for c in cols {
                push_column(&mut ret, c.clone(), &sel_el)?;
                own.push(c);
            }
            selects.push(sel);
        }
        let mut union = Vec::new();
        let branches = match obj.get("unionAll") {
            None => &[][..],
            Some(_) => {
                let b = array(obj, "unionAll", el)?;
                if b.is_empty() {
                    return Err(ViewError::new(format!("{el}.unionAll"), Reason::Empty));
                }
                b
            }
        };
        let mut first: Option<Vec<Column>> = None;
        for (i, u) in branches.iter().enumerate() {
            let uel = format!("{el}.unionAll[{i}]");
            let (sel, cols) = self.select(u, &uel, &ret)?;
            match first.as_mut() {
                None => first = Some(cols),
                Some(f) => {
                    let same = f.len() == cols.len()
                        && f.iter().zip(&cols).all(|(a, b)| {
                            a.name == b.name
                                && a.collection == b.collection
                                && (a.ty.is_none() || b.ty.is_none() || a.ty == b.ty)
                        });
                    if !same {
                        let describe = |cs: &[Column]| -> Vec<String> {
                            cs.iter()
                                .map(|c| match &c.ty {
                                    Some(t) => format!("{}: {t}", c.name),
                                    None => c.name.clone(),
                                })
                                .collect()
                        };
                        return Err(ViewError::new(
                            uel,
                            Reason::UnionMismatch {
                                expected: describe(f),
                                found: describe(&cols),
                            },
                        ));
                    }
                    // A type declared in a later branch types the output column.
                    for (a, b) in f.iter_mut().zip(&cols) {
                        if a.ty.is_none() {
                            a.ty = b.ty.clone();
                        }
                    }
                }
            }
            union.push(sel);
        }
        for c in first.unwrap_or_default() {
            push_column(&mut ret, c.clone(), &format!("{el}.unionAll"))?;
            own.push(c);
        }
        let null_row = own
            .iter()
            .map(|c| {
                if c.path.trim() == "%rowIndex" {
                    crate::Value::Integer(0)
                } else if c.collection {
                    crate::Value::Collection(Vec::new())
                } else {
                    crate::Value::Null
                }
            })
            .collect();
        Ok((
            Select {
                element: el.to_string(),
                iteration,
                columns,
                selects,
                union,
                null_row,
            },
            own,
        ))
    }
}

fn push_column(ret: &mut Vec<Column>, c: Column, el: &str) -> Result<(), ViewError> {
    if ret.iter().any(|r| r.name == c.name) {
        return Err(ViewError::new(el, Reason::ColumnCollision(c.name)));
    }
    ret.push(c);
    Ok(())
}

/// The ViewDefinition's `name` rule for columns and constants: `^[A-Za-z][A-Za-z0-9_]*$`.
fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn constants(obj: &Map<String, Json>) -> Result<Vec<Constant>, ViewError> {
    let mut out: Vec<Constant> = Vec::new();
    for (i, c) in array(obj, "constant", "")?.iter().enumerate() {
        let el = format!("constant[{i}]");
        let co = object(c, &el)?;
        let name = string(co, "name", &el)?
            .ok_or_else(|| ViewError::new(format!("{el}.name"), Reason::Missing))?;
        if !valid_name(name) {
            return Err(ViewError::new(
                format!("{el}.name"),
                Reason::InvalidName(name.to_string()),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(ViewError::new(
                el,
                Reason::DuplicateConstant(name.to_string()),
            ));
        }
        let mut value = None;
        for (k, v) in co {
            match k.as_str() {
                "id" | "extension" | "name" => {}
                k => {
                    let Some(ty) = k.strip_prefix("value").and_then(constant_type) else {
                        return Err(ViewError::new(&el, Reason::UnknownElement(k.to_string())));
                    };
                    if value.is_some() {
                        return Err(ViewError::new(&el, Reason::ConstantValue));
                    }
                    value = Some((ty, v));
                }
            }
        }
        let Some((fhir_type, v)) = value else {
            return Err(ViewError::new(el, Reason::ConstantValue));
        };
        let ok = if fhir_type == "integer64" {
            v.as_i64().is_some() || v.as_str().is_some_and(|s| s.parse::<i64>().is_ok())
        } else {
            fhir_model::primitive_value_ok(fhir_type, v)
        };
        if !ok {
            return Err(ViewError::new(
                format!(
                    "{el}.value{}{}",
                    fhir_type[..1].to_uppercase(),
                    &fhir_type[1..]
                ),
                Reason::ConstantInvalid(fhir_type.to_string()),
            ));
        }
        out.push(Constant {
            name: name.to_string(),
            fhir_type,
            value: v.clone(),
        });
    }
    Ok(out)
}

/// The FHIR type of a constant's `value[x]` suffix (the primitive types the spec allows).
fn constant_type(suffix: &str) -> Option<&'static str> {
    Some(match suffix {
        "Base64Binary" => "base64Binary",
        "Boolean" => "boolean",
        "Canonical" => "canonical",
        "Code" => "code",
        "Date" => "date",
        "DateTime" => "dateTime",
        "Decimal" => "decimal",
        "Id" => "id",
        "Instant" => "instant",
        "Integer" => "integer",
        "Integer64" => "integer64",
        "Oid" => "oid",
        "String" => "string",
        "PositiveInt" => "positiveInt",
        "Time" => "time",
        "UnsignedInt" => "unsignedInt",
        "Uri" => "uri",
        "Url" => "url",
        "Uuid" => "uuid",
        _ => return None,
    })
}

fn object<'j>(json: &'j Json, el: &str) -> Result<&'j Map<String, Json>, ViewError> {
    json.as_object()
        .ok_or_else(|| ViewError::new(el, Reason::WrongType("an object")))
}

fn join(el: &str, key: &str) -> String {
    if el.is_empty() {
        key.to_string()
    } else {
        format!("{el}.{key}")
    }
}

fn string<'j>(
    obj: &'j Map<String, Json>,
    key: &str,
    el: &str,
) -> Result<Option<&'j str>, ViewError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(ViewError::new(join(el, key), Reason::WrongType("a string"))),
    }
}

fn array<'j>(obj: &'j Map<String, Json>, key: &str, el: &str) -> Result<&'j [Json], ViewError> {
    match obj.get(key) {
        None => Ok(&[]),
        Some(Json::Array(a)) => Ok(a),
        Some(_) => Err(ViewError::new(join(el, key), Reason::WrongType("an array"))),
    }
}

fn check_keys(obj: &Map<String, Json>, allowed: &[&str], el: &str) -> Result<(), ViewError> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) && !k.starts_with('_') {
            return Err(ViewError::new(el, Reason::UnknownElement(k.to_string())));
        }
    }
    Ok(())
}
