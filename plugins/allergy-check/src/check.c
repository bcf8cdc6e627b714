// check.c: the clinicbox plugin `acme/allergy-check` (host ABI 1, Extism
// calling convention, docs/plugin-abi.md), written in freestanding C.
//
// Role: one export, `check`. It asks the host, through `fhir_search`
// (`extism:host/user`), for the patient's active MedicationRequests and
// active AllergyIntolerances, compares their RxNorm codings against a small
// built-in table of ingredient classes (plus exact code equality), and
// answers a JSON array of FHIR R4 `DetectedIssue` resources, one per
// conflicting (medication, allergy) pair; `[]` when there is none. A host
// `OperationOutcome` fails the call with `fhir_search refused: <diagnostics>`.
// See README.md for the rules.
//
// Invariants:
// - No libc, no WASI: the module imports only the Extism kernel functions
//   declared below (`extism:host/env`) and `fhir_search` (`extism:host/user`),
//   each by an explicit import attribute, and links with no undefined
//   symbol allowed.
// - Every read is bounded by a length: the JSON cursor never reads at or past
//   `Cur.n`, kernel blocks are copied by their `length`, and escapes are
//   validated before they are decoded. Every store is bounded by a capacity:
//   an answer is at most ANSWER_MAX bytes, an answer at most MAX_ENTRIES
//   entries, a resource at most MAX_CODINGS codings, JSON at most MAX_DEPTH
//   levels deep, the output at most OUTPUT_MAX bytes, the error message at
//   most ERR_MAX bytes (truncated at a UTF-8 boundary). Going over a cap
//   fails the call with a message naming the cap; nothing is silently
//   dropped or truncated except the error text.
// - Fail, don't guess: malformed JSON, a wrongly typed field, a lone UTF-16
//   surrogate, an entry of the wrong resource type, an invalid id, a
//   non-Patient or disagreeing patient reference, or a search that matched
//   more than one page all fail the call.
// - Deterministic: no clock, no randomness, no state kept across calls (the
//   heap and all tables are reset at the start of each call). Issues come
//   out in answer order: medications outer, allergies inner.
// - Memory: everything a call needs is carved from one bump heap above
//   `__heap_base` that grows with memory.grow; growth beyond the host's
//   memory limit fails the call cleanly. The stack sits below the data
//   (`--stack-first`), so an overflow traps instead of corrupting data, and
//   recursion is bounded by MAX_DEPTH anyway.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr; // 32 bits on wasm32, 64 natively (tests)

// ---------------------------------------------------------------- caps

#define ANSWER_MAX (2u << 20) // bytes of one fhir_search answer
#define MAX_ENTRIES 256u      // entries in one answer (all modes)
#define MAX_CODINGS 64u       // codings of one resource's code concept
#define MAX_DEPTH 64          // JSON nesting
#define OUTPUT_MAX (1u << 20) // the host's own output limit
#define INPUT_MAX 4096u       // the input must be empty or {}
#define ERR_MAX 2048u         // error message, truncated beyond

// The two searches. `_count` asks for one page as large as MAX_ENTRIES
// (the host's default page is 50); a larger match set fails the call.
#define MED_QUERY "MedicationRequest?status=active&_count=256"
#define ALG_QUERY "AllergyIntolerance?clinical-status=active&_count=256"

#define RXNORM "http://www.nlm.nih.gov/research/umls/rxnorm"
#define VERIFICATION "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"

// ---------------------------------------------------------------- imports

#if defined(__wasm__)
#define KERNEL(n) __attribute__((import_module("extism:host/env"), import_name(#n)))
#define HOST(n) __attribute__((import_module("extism:host/user"), import_name(#n)))
#define EXPORT(n) __attribute__((export_name(#n)))
#else
#define KERNEL(n)
#define HOST(n)
#define EXPORT(n)
#endif

// Extism kernel (extism-pdk 1.4 `extism.rs`): offsets and lengths are i64
// in the kernel's own memory, bytes travel as i32.
KERNEL(alloc) u64 extism_alloc(u64 len);
KERNEL(free) void extism_free(u64 off);
KERNEL(length) u64 extism_length(u64 off);
KERNEL(load_u8) u8 extism_load_u8(u64 off);
KERNEL(load_u64) u64 extism_load_u64(u64 off);
KERNEL(store_u8) void extism_store_u8(u64 off, u8 byte);
KERNEL(store_u64) void extism_store_u64(u64 off, u64 word);
KERNEL(input_length) u64 extism_input_length(void);
KERNEL(input_load_u8) u8 extism_input_load_u8(u64 i);
KERNEL(input_load_u64) u64 extism_input_load_u64(u64 i);
KERNEL(output_set) void extism_output_set(u64 off, u64 len);
KERNEL(error_set) void extism_error_set(u64 off);
// clinicbox: a UTF-8 search string in, a UTF-8 JSON document out.
HOST(fhir_search) u64 fhir_search(u64 query_off);

// ---------------------------------------------------------------- libc bits

#if defined(__wasm__)
// The compiler may emit calls to these for struct copies and zeroing
// (-ffreestanding keeps it from turning these loops back into calls).
void *memcpy(void *dst, const void *src, unsigned long n) {
  u8 *d = dst;
  const u8 *s = src;
  while (n--) *d++ = *s++;
  return dst;
}
void *memset(void *dst, int c, unsigned long n) {
  u8 *d = dst;
  while (n--) *d++ = (u8)c;
  return dst;
}
#endif

static void copy(u8 *dst, const u8 *src, u32 n) {
  for (u32 i = 0; i < n; i++) dst[i] = src[i];
}

static u32 cstrlen(const char *s) {
  u32 n = 0;
  while (s[n]) n++;
  return n;
}

// ---------------------------------------------------------------- strings

// A decoded (unescaped) UTF-8 string: bytes and length, no terminator.
typedef struct {
  const u8 *p;
  u32 len;
} Str;

static int str_eqn(Str a, const char *lit, u32 n) {
  if (a.len != n) return 0;
  for (u32 i = 0; i < n; i++)
    if (a.p[i] != (u8)lit[i]) return 0;
  return 1;
}

static int str_eq(Str a, const char *lit) { return str_eqn(a, lit, cstrlen(lit)); }

// s equals a string literal (its length known at compile time).
#define EQ(s, lit) str_eqn((s), "" lit, sizeof(lit) - 1)

static int str_same(Str a, Str b) {
  if (a.len != b.len) return 0;
  for (u32 i = 0; i < a.len; i++)
    if (a.p[i] != b.p[i]) return 0;
  return 1;
}

static Str lit_str(const char *s) {
  Str r = {(const u8 *)s, cstrlen(s)};
  return r;
}

// ---------------------------------------------------------------- heap

// One bump heap per call, from __heap_base (wasm) or a static arena
// (native tests) upwards. Never freed piecemeal: reset per call.
#if defined(__wasm__)
extern u8 __heap_base;
#define PAGE 65536u
static uptr heap_lo(void) { return (uptr)&__heap_base; }
// Makes [.., end) addressable; 0 on success.
static int heap_reach(uptr end) {
  uptr have = (uptr)__builtin_wasm_memory_size(0) * PAGE;
  if (end <= have) return 0;
  uptr pages = (end - have + PAGE - 1) / PAGE;
  return __builtin_wasm_memory_grow(0, pages) == (uptr)-1 ? -1 : 0;
}
#else
#define NATIVE_HEAP (48u << 20)
static u8 native_heap[NATIVE_HEAP] __attribute__((aligned(16)));
static uptr heap_lo(void) { return (uptr)native_heap; }
static int heap_reach(uptr end) { return end <= (uptr)native_heap + NATIVE_HEAP ? 0 : -1; }
#endif

static uptr heap_cur;

static void heap_reset(void) { heap_cur = heap_lo(); }

// n bytes, 8-aligned, or 0 when memory cannot grow that far.
static u8 *heap_take(u32 n) {
  uptr p = (heap_cur + 7u) & ~(uptr)7u;
  uptr end = p + n;
  if (p < heap_cur || end < p) return 0;
  if (heap_reach(end)) return 0;
  heap_cur = end;
  return (u8 *)p;
}

// ---------------------------------------------------------------- errors

// The call's error message. Appends past ERR_MAX are dropped and the
// message then ends with "…" at a UTF-8 boundary (err_finish).
static u8 err_buf[ERR_MAX];
static u32 err_len;
static int err_cut;

static void err_reset(void) {
  err_len = 0;
  err_cut = 0;
}

static void err_bytes(const u8 *p, u32 n) {
  u32 room = ERR_MAX - 3 - err_len; // 3 bytes kept for "…"
  if (n > room) {
    n = room;
    err_cut = 1;
  }
  copy(err_buf + err_len, p, n);
  err_len += n;
}

static void err_lit(const char *s) { err_bytes((const u8 *)s, cstrlen(s)); }
static void err_str(Str s) { err_bytes(s.p, s.len); }

static void err_u64(u64 v) {
  u8 d[20];
  u32 n = 0;
  do {
    d[n++] = (u8)('0' + v % 10);
    v /= 10;
  } while (v && n < 20);
  u8 out[20];
  for (u32 i = 0; i < n; i++) out[i] = d[n - 1 - i];
  err_bytes(out, n);
}

static void err_finish(void) {
  if (!err_cut) return;
  // Drop a partial UTF-8 sequence at the cut: back up over continuation
  // bytes to the lead byte, and drop the lead too if its sequence is short.
  u32 end = err_len;
  u32 i = end;
  while (i > 0 && (err_buf[i - 1] & 0xC0) == 0x80) i--;
  if (i > 0 && err_buf[i - 1] >= 0xC0) {
    u8 lead = err_buf[i - 1];
    u32 need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
    if (end - (i - 1) < need) err_len = i - 1;
  }
  static const u8 ellipsis[3] = {0xE2, 0x80, 0xA6};
  copy(err_buf + err_len, ellipsis, 3);
  err_len += 3;
}

// Where we are, for messages: which answer, which entry.
static const char *g_ctx = "check";
static int g_entry = -1;

static void err_where(void) {
  err_lit(g_ctx);
  if (g_entry >= 0) {
    err_lit(": entry[");
    err_u64((u64)g_entry);
    err_lit("]");
  }
  err_lit(": ");
}

// All failing paths return FAIL after writing the message.
#define FAIL (-1)

static int fail(const char *msg) {
  err_where();
  err_lit(msg);
  return FAIL;
}

static int fail_named(const char *field, const char *problem) {
  err_where();
  err_lit(field);
  err_lit(problem);
  return FAIL;
}

// ---------------------------------------------------------------- kernel I/O

// Copies n bytes of the kernel block at off into dst.
static void kernel_load(u64 off, u8 *dst, u32 n) {
  u32 i = 0;
  for (; n - i >= 8; i += 8) {
    u64 w = extism_load_u64(off + i);
    for (u32 k = 0; k < 8; k++) dst[i + k] = (u8)(w >> (8 * k));
  }
  for (; i < n; i++) dst[i] = extism_load_u8(off + i);
}

// A new kernel block holding the n bytes at src; 0 if the kernel is full.
static u64 kernel_store(const u8 *src, u32 n) {
  u64 off = extism_alloc(n);
  if (!off) return 0;
  u32 i = 0;
  for (; n - i >= 8; i += 8) {
    u64 w = 0;
    for (u32 k = 0; k < 8; k++) w |= (u64)src[i + k] << (8 * k);
    extism_store_u64(off + i, w);
  }
  for (; i < n; i++) extism_store_u8(off + i, src[i]);
  return off;
}

// ---------------------------------------------------------------- UTF-8

#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull

// 8 bytes at p, in any alignment.
static u64 word_at(const u8 *p) {
  u64 w;
  __builtin_memcpy(&w, p, 8);
  return w;
}

// Strict UTF-8 (no overlongs, no surrogates, at most U+10FFFF).
static int utf8_valid(const u8 *s, u32 n) {
  u32 i = 0;
  while (i < n) {
    // ASCII runs, 8 bytes at a time.
    while (n - i >= 8 && !(word_at(s + i) & HIGHS)) i += 8;
    if (i == n) break;
    u8 b = s[i];
    if (b < 0x80) {
      i++;
      continue;
    }
    u32 need;
    u8 lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) need = 1;
    else if (b == 0xE0) need = 2, lo = 0xA0;
    else if (b >= 0xE1 && b <= 0xEC) need = 2;
    else if (b == 0xED) need = 2, hi = 0x9F;
    else if (b >= 0xEE && b <= 0xEF) need = 2;
    else if (b == 0xF0) need = 3, lo = 0x90;
    else if (b >= 0xF1 && b <= 0xF3) need = 3;
    else if (b == 0xF4) need = 3, hi = 0x8F;
    else return 0;
    if (n - i <= need) return 0;
    if (s[i + 1] < lo || s[i + 1] > hi) return 0;
    for (u32 k = 2; k <= need; k++)
      if ((s[i + k] & 0xC0) != 0x80) return 0;
    i += need + 1;
  }
  return 1;
}

// ---------------------------------------------------------------- JSON cursor

// A cursor over one JSON document of n bytes. All reads check i < n.
typedef struct {
  const u8 *s;
  u32 n;
  u32 i;
} Cur;

// The decoded-string pool of the answer being parsed. It is as large as
// the answer: each raw string is decoded at most once and decoding never
// lengthens a string, so it cannot fill up (and is checked anyway).
static u8 *pool;
static u32 pool_used, pool_cap;

static int syntax(const Cur *c, const char *expected) {
  err_where();
  err_lit("malformed JSON at byte ");
  err_u64(c->i);
  err_lit(": expected ");
  err_lit(expected);
  return FAIL;
}

static void ws(Cur *c) {
  while (c->i < c->n) {
    u8 b = c->s[c->i];
    if (b != ' ' && b != '\t' && b != '\n' && b != '\r') break;
    c->i++;
  }
}

// The next non-blank byte, or -1 at the end.
static int peek(Cur *c) {
  ws(c);
  return c->i < c->n ? c->s[c->i] : -1;
}

static int hexval(u8 b) {
  if (b >= '0' && b <= '9') return b - '0';
  if (b >= 'a' && b <= 'f') return b - 'a' + 10;
  if (b >= 'A' && b <= 'F') return b - 'A' + 10;
  return -1;
}

// A raw string token: the bytes between the quotes, escapes validated but
// not decoded.
typedef struct {
  u32 off, len;
  int esc;
} Raw;

// Nonzero when some byte of w is '"', '\\' or below 0x20 (exact: these
// zero-byte tests have no false negatives and, with no such byte, no
// borrows, hence no false positives).
static u64 string_special(u64 w) {
  u64 q = w ^ (ONES * '"'), b = w ^ (ONES * '\\');
  return (((q - ONES) & ~q) | ((b - ONES) & ~b) | ((w - ONES * 0x20) & ~w)) & HIGHS;
}

static int str_raw(Cur *c, Raw *r) {
  if (peek(c) != '"') return syntax(c, "a string");
  c->i++;
  r->off = c->i;
  r->esc = 0;
  while (c->i < c->n) {
    // Plain runs, 8 bytes at a time.
    while (c->n - c->i >= 8 && !string_special(word_at(c->s + c->i))) c->i += 8;
    if (c->i >= c->n) break;
    u8 b = c->s[c->i];
    if (b == '"') {
      r->len = c->i - r->off;
      c->i++;
      return 0;
    }
    if (b < 0x20) return syntax(c, "no raw control character in a string");
    if (b != '\\') {
      c->i++;
      continue;
    }
    r->esc = 1;
    if (c->n - c->i < 2) break;
    u8 e = c->s[c->i + 1];
    if (e == 'u') {
      if (c->n - c->i < 6) break;
      for (u32 k = 2; k < 6; k++)
        if (hexval(c->s[c->i + k]) < 0) return syntax(c, "four hex digits after \\u");
      c->i += 6;
    } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' ||
               e == 'r' || e == 't') {
      c->i += 2;
    } else {
      return syntax(c, "a valid escape after a backslash");
    }
  }
  c->i = c->n;
  return syntax(c, "the end of the string");
}

static u32 hex4(const u8 *p) {
  return (u32)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 | hexval(p[3]));
}

// Decodes a validated raw string. Unescaped strings are returned in place;
// escaped ones are decoded into the pool.
static int str_decode(const Cur *c, const Raw *r, Str *out) {
  const u8 *s = c->s + r->off;
  u32 n = r->len;
  if (!r->esc) {
    out->p = s;
    out->len = n;
    return 0;
  }
  if (pool_cap - pool_used < n) return fail("internal error: string pool full");
  u8 *d = pool + pool_used;
  u32 o = 0, i = 0;
  while (i < n) {
    u8 b = s[i];
    if (b != '\\') {
      d[o++] = b;
      i++;
      continue;
    }
    // str_raw guarantees a complete escape here.
    u8 e = s[i + 1];
    if (e != 'u') {
      d[o++] = e == 'b' ? 8 : e == 'f' ? 12 : e == 'n' ? 10 : e == 'r' ? 13 : e == 't' ? 9 : e;
      i += 2;
      continue;
    }
    u32 cp = hex4(s + i + 2);
    i += 6;
    if (cp >= 0xDC00 && cp <= 0xDFFF) return fail("a string holds a lone low surrogate escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (n - i < 6 || s[i] != '\\' || s[i + 1] != 'u')
        return fail("a string holds a lone high surrogate escape");
      u32 lo = hex4(s + i + 2);
      if (lo < 0xDC00 || lo > 0xDFFF) return fail("a string holds a lone high surrogate escape");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      i += 6;
    }
    // 6 (or 12) escape bytes become at most 3 (or 4) UTF-8 bytes.
    if (cp < 0x80) {
      d[o++] = (u8)cp;
    } else if (cp < 0x800) {
      d[o++] = (u8)(0xC0 | cp >> 6);
      d[o++] = (u8)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      d[o++] = (u8)(0xE0 | cp >> 12);
      d[o++] = (u8)(0x80 | (cp >> 6 & 0x3F));
      d[o++] = (u8)(0x80 | (cp & 0x3F));
    } else {
      d[o++] = (u8)(0xF0 | cp >> 18);
      d[o++] = (u8)(0x80 | (cp >> 12 & 0x3F));
      d[o++] = (u8)(0x80 | (cp >> 6 & 0x3F));
      d[o++] = (u8)(0x80 | (cp & 0x3F));
    }
  }
  pool_used += o;
  out->p = d;
  out->len = o;
  return 0;
}

// A number, validated against the JSON grammar. *uint gets its value when
// it is a plain non-negative integer (saturating), else *is_uint = 0.
static int number(Cur *c, u64 *uint, int *is_uint) {
  ws(c);
  u32 i = c->i;
  const u8 *s = c->s;
  u32 n = c->n;
  int plain = 1;
  u64 v = 0;
  if (i < n && s[i] == '-') {
    plain = 0;
    i++;
  }
  if (i >= n || s[i] < '0' || s[i] > '9') {
    c->i = i;
    return syntax(c, "a digit");
  }
  if (s[i] == '0') {
    i++;
  } else {
    while (i < n && s[i] >= '0' && s[i] <= '9') {
      u64 dgt = (u64)(s[i] - '0');
      v = v > (~0ull - dgt) / 10 ? ~0ull : v * 10 + dgt;
      i++;
    }
  }
  if (i < n && s[i] == '.') {
    plain = 0;
    i++;
    if (i >= n || s[i] < '0' || s[i] > '9') {
      c->i = i;
      return syntax(c, "a digit after the decimal point");
    }
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
  }
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    plain = 0;
    i++;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    if (i >= n || s[i] < '0' || s[i] > '9') {
      c->i = i;
      return syntax(c, "a digit in the exponent");
    }
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
  }
  c->i = i;
  *uint = v;
  *is_uint = plain;
  return 0;
}

static int literal(Cur *c, const char *word) {
  u32 k = cstrlen(word);
  if (c->n - c->i < k) return syntax(c, word);
  for (u32 j = 0; j < k; j++)
    if (c->s[c->i + j] != (u8)word[j]) return syntax(c, word);
  c->i += k;
  return 0;
}

static int obj_open(Cur *c, const char *what, int *more);
static int obj_key(Cur *c, Str *key);
static int obj_next(Cur *c, int *more);
static int arr_open(Cur *c, const char *what, int *more);
static int arr_next(Cur *c, int *more);

// Skips (and validates) one value of any kind; depth is its nesting level.
static int skip_value(Cur *c, int depth) {
  int p = peek(c);
  if ((p == '{' || p == '[') && depth >= MAX_DEPTH) {
    err_where();
    err_lit("JSON nested deeper than ");
    err_u64(MAX_DEPTH);
    err_lit(" levels");
    return FAIL;
  }
  int more;
  if (p == '{') {
    if (obj_open(c, "value", &more)) return FAIL;
    while (more) {
      Raw k;
      if (str_raw(c, &k)) return FAIL;
      if (peek(c) != ':') return syntax(c, "':'");
      c->i++;
      if (skip_value(c, depth + 1) || obj_next(c, &more)) return FAIL;
    }
    return 0;
  }
  if (p == '[') {
    if (arr_open(c, "value", &more)) return FAIL;
    while (more)
      if (skip_value(c, depth + 1) || arr_next(c, &more)) return FAIL;
    return 0;
  }
  if (p == '"') {
    Raw r;
    return str_raw(c, &r);
  }
  if (p == 't') return literal(c, "true");
  if (p == 'f') return literal(c, "false");
  if (p == 'n') return literal(c, "null");
  if (p == '-' || (p >= '0' && p <= '9')) {
    u64 v;
    int plain;
    return number(c, &v, &plain);
  }
  return syntax(c, "a value");
}

// `{`: *more says whether a member follows (then the cursor is at its key).
static int obj_open(Cur *c, const char *what, int *more) {
  if (peek(c) != '{') return fail_named(what, " must be an object");
  c->i++;
  int p = peek(c);
  if (p == '}') {
    c->i++;
    *more = 0;
    return 0;
  }
  if (p != '"') return syntax(c, "a member name or '}'");
  *more = 1;
  return 0;
}

// A member name and its ':'; the cursor is then at the value.
static int obj_key(Cur *c, Str *key) {
  Raw r;
  if (str_raw(c, &r) || str_decode(c, &r, key)) return FAIL;
  if (peek(c) != ':') return syntax(c, "':'");
  c->i++;
  return 0;
}

// After a member's value: ',' and another member, or '}'.
static int obj_next(Cur *c, int *more) {
  int p = peek(c);
  if (p == '}') {
    c->i++;
    *more = 0;
    return 0;
  }
  if (p != ',') return syntax(c, "',' or '}'");
  c->i++;
  if (peek(c) != '"') return syntax(c, "a member name");
  *more = 1;
  return 0;
}

static int arr_open(Cur *c, const char *what, int *more) {
  if (peek(c) != '[') return fail_named(what, " must be an array");
  c->i++;
  if (peek(c) == ']') {
    c->i++;
    *more = 0;
    return 0;
  }
  if (c->i >= c->n) return syntax(c, "a value or ']'");
  *more = 1;
  return 0;
}

static int arr_next(Cur *c, int *more) {
  int p = peek(c);
  if (p == ']') {
    c->i++;
    *more = 0;
    return 0;
  }
  if (p != ',') return syntax(c, "',' or ']'");
  c->i++;
  int q = peek(c);
  if (q == ']' || q < 0) return syntax(c, "a value");
  *more = 1;
  return 0;
}

// A string-valued field.
static int get_string(Cur *c, const char *field, Str *out) {
  if (peek(c) != '"') return fail_named(field, " must be a string");
  Raw r;
  return str_raw(c, &r) || str_decode(c, &r, out) ? FAIL : 0;
}

// A field seen twice in one object is refused: which one would count?
static int once(unsigned *seen, unsigned bit, const char *field) {
  if (*seen & bit) return fail_named(field, " appears twice in one object");
  *seen |= bit;
  return 0;
}

// ---------------------------------------------------------------- classes

// RxNorm ingredient classes. An allergy to any member conflicts with an
// active order for any member of the same class.
typedef struct {
  const char *code;
  int cls;
} ClassMember;

static const char *const CLASS_NAME[] = {"penicillins", "sulfonamides"};

static const ClassMember CLASS_TABLE[] = {
    {"7980", 0},   // penicillin G
    {"723", 0},    // amoxicillin
    {"733", 0},    // ampicillin
    {"7984", 0},   // penicillin V
    {"70618", 0},  // penicillin
    {"10180", 1},  // sulfamethoxazole
    {"10831", 1},  // sulfasalazine
};

static int class_of(Str code) {
  for (u32 i = 0; i < sizeof CLASS_TABLE / sizeof CLASS_TABLE[0]; i++)
    if (str_eq(code, CLASS_TABLE[i].code)) return CLASS_TABLE[i].cls;
  return -1;
}

// ---------------------------------------------------------------- FHIR

typedef struct {
  Str system, code; // len 0 and p 0 when absent
  int rx;           // an RxNorm coding with a code (set by classify)
  int cls;          // its class in CLASS_TABLE, or -1
} Coding;

typedef struct {
  Str id;
  Str patient; // "Patient/<id>", or len 0 when the resource names none
  u32 c0, nc;  // codings: cod[c0 .. c0+nc)
  u32 nrx;     // how many of them are RxNorm codings with a code
  int has_category, category_medication, refuted;
} Res;

typedef struct {
  const char *type;  // the expected resourceType
  const char *query; // the search
  const char *ctx;   // message prefix
  int allergy;
  Res res[MAX_ENTRIES];
  u32 nres;
  Coding cod[MAX_ENTRIES * MAX_CODINGS];
  u32 ncod;
} Answer;

// Zero-initialised (in .bss, not a data segment); labelled in run().
static Answer meds, algs;

// FHIR id: [A-Za-z0-9\-\.]{1,64}
static int fhir_id_ok(Str id) {
  if (id.len < 1 || id.len > 64) return 0;
  for (u32 i = 0; i < id.len; i++) {
    u8 b = id.p[i];
    int ok = (b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z') || (b >= '0' && b <= '9') ||
             b == '-' || b == '.';
    if (!ok) return 0;
  }
  return 1;
}

// "Patient/x", "https://host/fhir/Patient/x" or either with "/_history/v"
// -> "Patient/x" (a view into ref). 0 on success.
static int patient_of(Str ref, Str *out) {
  u32 end = ref.len;
  static const char hist[] = "/_history/";
  u32 hl = sizeof hist - 1;
  for (u32 i = 0; i + hl <= ref.len; i++) {
    Str tail = {ref.p + i, hl};
    if (str_eq(tail, hist)) {
      end = i;
      break;
    }
  }
  u32 slash = end;
  while (slash > 0 && ref.p[slash - 1] != '/') slash--;
  if (slash == 0) return FAIL;
  Str id = {ref.p + slash, end - slash};
  if (!fhir_id_ok(id)) return FAIL;
  // "Patient/" must end at slash and start the reference or follow a '/'.
  if (slash < 8) return FAIL;
  u32 start = slash - 8;
  Str ty = {ref.p + start, 8};
  if (!EQ(ty, "Patient/")) return FAIL;
  if (start > 0 && ref.p[start - 1] != '/') return FAIL;
  out->p = ref.p + start;
  out->len = end - start;
  return 0;
}

// Reference.reference of a `subject` or `patient`; other members skipped.
static int walk_reference(Cur *c, int depth, const char *field, Str *ref, int *has) {
  int more;
  unsigned seen = 0;
  if (obj_open(c, field, &more)) return FAIL;
  while (more) {
    Str k;
    if (obj_key(c, &k)) return FAIL;
    if (EQ(k, "reference")) {
      if (once(&seen, 1, "reference") || get_string(c, "reference", ref)) return FAIL;
      *has = 1;
    } else if (skip_value(c, depth + 1)) {
      return FAIL;
    }
    if (obj_next(c, &more)) return FAIL;
  }
  return 0;
}

// One Coding: system and code.
static int walk_coding(Cur *c, int depth, Coding *out) {
  int more;
  unsigned seen = 0;
  out->system.p = out->code.p = 0;
  out->system.len = out->code.len = 0;
  if (obj_open(c, "coding[]", &more)) return FAIL;
  while (more) {
    Str k;
    if (obj_key(c, &k)) return FAIL;
    if (EQ(k, "system")) {
      if (once(&seen, 1, "coding.system") || get_string(c, "coding.system", &out->system))
        return FAIL;
    } else if (EQ(k, "code")) {
      if (once(&seen, 2, "coding.code") || get_string(c, "coding.code", &out->code)) return FAIL;
    } else if (skip_value(c, depth + 1)) {
      return FAIL;
    }
    if (obj_next(c, &more)) return FAIL;
  }
  return 0;
}

// A CodeableConcept. With collect, its codings are appended to a->cod for
// r (at most MAX_CODINGS); otherwise they only set r->refuted when they say
// the allergy is refuted or entered in error (verificationStatus).
static int walk_concept(Cur *c, int depth, const char *field, Answer *a, Res *r, int collect) {
  int more;
  unsigned seen = 0;
  if (obj_open(c, field, &more)) return FAIL;
  while (more) {
    Str k;
    if (obj_key(c, &k)) return FAIL;
    if (EQ(k, "coding")) {
      int items;
      if (once(&seen, 1, "coding") || arr_open(c, "coding", &items)) return FAIL;
      while (items) {
        Coding cd;
        if (walk_coding(c, depth + 2, &cd)) return FAIL;
        if (collect) {
          if (r->nc >= MAX_CODINGS) {
            err_where();
            err_lit(field);
            err_lit(" has more than ");
            err_u64(MAX_CODINGS);
            err_lit(" codings");
            return FAIL;
          }
          cd.rx = EQ(cd.system, RXNORM) && cd.code.len;
          cd.cls = cd.rx ? class_of(cd.code) : -1;
          a->cod[a->ncod++] = cd;
          r->nc++;
          r->nrx += (u32)cd.rx;
        } else if (EQ(cd.system, VERIFICATION) &&
                   (EQ(cd.code, "refuted") || EQ(cd.code, "entered-in-error"))) {
          r->refuted = 1;
        }
        if (arr_next(c, &items)) return FAIL;
      }
    } else if (skip_value(c, depth + 1)) {
      return FAIL;
    }
    if (obj_next(c, &more)) return FAIL;
  }
  return 0;
}

// AllergyIntolerance.category: an array of codes.
static int walk_category(Cur *c, Res *r) {
  int more;
  if (arr_open(c, "category", &more)) return FAIL;
  while (more) {
    Str v;
    if (get_string(c, "category[]", &v)) return FAIL;
    r->has_category = 1;
    if (EQ(v, "medication")) r->category_medication = 1;
    if (arr_next(c, &more)) return FAIL;
  }
  return 0;
}

// The answer's patient, which every resource naming one must agree with.
static Str g_patient;
static const char *g_patient_type;
static Str g_patient_id;

// What resource_parse read that resource_commit checks.
enum { F_RT = 1, F_ID = 2, F_CODE = 4, F_PAT = 8, F_CAT = 16, F_VER = 32, F_STATUS = 64 };
typedef struct {
  Str rt, ref, status;
  int has_ref;
  unsigned seen;
} Pending;

// Parses one entry's resource into the next slot, a->res[a->nres], and
// appends its codings to a->cod. Provisional: the entry's search.mode may
// come later. resource_commit then checks and keeps it; a non-match entry
// is dropped by resetting a->ncod to the slot's c0. Only JSON and shape
// errors fail here, so they fail a non-match entry too.
static int resource_parse(Cur *c, Answer *a, Pending *pd) {
  Res *r = &a->res[a->nres];
  r->id.p = r->patient.p = 0;
  r->id.len = r->patient.len = 0;
  r->c0 = a->ncod;
  r->nc = r->nrx = 0;
  r->has_category = r->category_medication = r->refuted = 0;
  Str rt = {0, 0}, ref = {0, 0}, status = {0, 0};
  int has_ref = 0;
  unsigned seen = 0;
  int more;
  pd->seen = 0;
  const char *code_field = a->allergy ? "code" : "medicationCodeableConcept";
  const char *pat_field = a->allergy ? "patient" : "subject";
  if (obj_open(c, "resource", &more)) return FAIL;
  while (more) {
    Str k;
    if (obj_key(c, &k)) return FAIL;
    int e = 0;
    if (EQ(k, "resourceType")) {
      e = once(&seen, F_RT, "resourceType") || get_string(c, "resourceType", &rt);
    } else if (EQ(k, "id")) {
      e = once(&seen, F_ID, "id") || get_string(c, "id", &r->id);
    } else if (str_eq(k, code_field)) {
      e = once(&seen, F_CODE, code_field) || walk_concept(c, 3, code_field, a, r, 1);
    } else if (str_eq(k, pat_field)) {
      e = once(&seen, F_PAT, pat_field) || walk_reference(c, 3, pat_field, &ref, &has_ref);
    } else if (a->allergy && EQ(k, "category")) {
      e = once(&seen, F_CAT, "category") || walk_category(c, r);
    } else if (a->allergy && EQ(k, "verificationStatus")) {
      e = once(&seen, F_VER, "verificationStatus") ||
          walk_concept(c, 3, "verificationStatus", a, r, 0);
    } else if (!a->allergy && EQ(k, "status")) {
      e = once(&seen, F_STATUS, "status") || get_string(c, "status", &status);
    } else {
      e = skip_value(c, 3);
    }
    if (e || obj_next(c, &more)) return FAIL;
  }
  pd->rt = rt;
  pd->ref = ref;
  pd->status = status;
  pd->has_ref = has_ref;
  pd->seen = seen;
  return 0;
}

// Checks the resource resource_parse read (type, id, status, patient)
// and keeps it.
static int resource_commit(Answer *a, const Pending *pd) {
  Res *r = &a->res[a->nres];
  Str rt = pd->rt, ref = pd->ref, status = pd->status;
  unsigned seen = pd->seen;
  const char *pat_field = a->allergy ? "patient" : "subject";
  if (!(seen & F_RT) || !str_eq(rt, a->type)) {
    err_where();
    err_lit("resource is ");
    if (seen & F_RT) err_str(rt);
    else err_lit("without resourceType");
    err_lit(", not a ");
    err_lit(a->type);
    return FAIL;
  }
  if (!(seen & F_ID)) return fail("resource has no id");
  if (!fhir_id_ok(r->id)) {
    err_where();
    err_lit("id \"");
    err_str(r->id);
    err_lit("\" is not a valid FHIR id");
    return FAIL;
  }
  if ((seen & F_STATUS) && !EQ(status, "active")) {
    err_where();
    err_lit("MedicationRequest/");
    err_str(r->id);
    err_lit(" has status ");
    err_str(status);
    err_lit(", but the search asked for active ones");
    return FAIL;
  }
  if (pd->has_ref) {
    if (patient_of(ref, &r->patient)) {
      err_where();
      err_lit(a->type);
      err_lit("/");
      err_str(r->id);
      err_lit(": ");
      err_lit(pat_field);
      err_lit(".reference \"");
      err_str(ref);
      err_lit("\" is not a Patient reference");
      return FAIL;
    }
    if (!g_patient.len) {
      g_patient = r->patient;
      g_patient_type = a->type;
      g_patient_id = r->id;
    } else if (!str_same(g_patient, r->patient)) {
      err_where();
      err_lit(a->type);
      err_lit("/");
      err_str(r->id);
      err_lit(" is for ");
      err_str(r->patient);
      err_lit(", but ");
      err_lit(g_patient_type);
      err_lit("/");
      err_str(g_patient_id);
      err_lit(" is for ");
      err_str(g_patient);
      err_lit("; refusing to mix patients");
      return FAIL;
    }
  }
  a->nres++;
  return 0;
}

// Bundle.entry: each entry's resource is parsed (resource_parse); a match
// entry's is then checked and kept (resource_commit), an include or
// outcome entry's dropped.
static int walk_entries(Cur *c, Answer *a, u32 *matches) {
  int more;
  u32 count = 0;
  if (arr_open(c, "Bundle.entry", &more)) return FAIL;
  while (more) {
    if (count >= MAX_ENTRIES) {
      g_entry = -1;
      err_where();
      err_lit("more than ");
      err_u64(MAX_ENTRIES);
      err_lit(" entries");
      return FAIL;
    }
    g_entry = (int)count++;
    enum { RES = 1, SEARCH = 2, MODE = 4 };
    unsigned seen = 0;
    Pending pd;
    Str mode = {0, 0};
    int emore;
    if (obj_open(c, "entry", &emore)) return FAIL;
    while (emore) {
      Str k;
      if (obj_key(c, &k)) return FAIL;
      int e = 0;
      if (EQ(k, "resource")) {
        e = once(&seen, RES, "resource") || resource_parse(c, a, &pd);
      } else if (EQ(k, "search")) {
        int smore = 0;
        e = once(&seen, SEARCH, "search") || obj_open(c, "search", &smore);
        while (!e && smore) {
          Str sk;
          e = obj_key(c, &sk);
          if (e) break;
          if (EQ(sk, "mode"))
            e = once(&seen, MODE, "search.mode") || get_string(c, "search.mode", &mode);
          else
            e = skip_value(c, 4);
          e = e || obj_next(c, &smore);
        }
      } else {
        e = skip_value(c, 3);
      }
      if (e || obj_next(c, &emore)) return FAIL;
    }
    if (!(seen & MODE) || EQ(mode, "match")) {
      if (!(seen & RES)) return fail("entry has no resource");
      if (resource_commit(a, &pd)) return FAIL;
      (*matches)++;
    } else if (seen & RES) {
      a->ncod = a->res[a->nres].c0; // an include or outcome entry: dropped
    }
    g_entry = -1;
    if (arr_next(c, &more)) return FAIL;
  }
  return 0;
}

// OperationOutcome.issue -> "fhir_search refused: d1; d2". Each issue gives
// its diagnostics, else details.text, else code. The message is assembled
// only once the issues parsed, so a malformed outcome reports that instead.
#define MAX_ISSUES 16u

static int refused(Cur *c) {
  Str parts[MAX_ISSUES];
  u32 nparts = 0, extra = 0;
  int more;
  if (arr_open(c, "OperationOutcome.issue", &more)) return FAIL;
  while (more) {
    Str diag = {0, 0}, text = {0, 0}, code = {0, 0};
    int imore;
    if (obj_open(c, "issue", &imore)) return FAIL;
    while (imore) {
      Str k;
      if (obj_key(c, &k)) return FAIL;
      int e;
      if (EQ(k, "diagnostics")) {
        e = get_string(c, "issue.diagnostics", &diag);
      } else if (EQ(k, "code")) {
        e = get_string(c, "issue.code", &code);
      } else if (EQ(k, "details")) {
        int dmore = 0;
        e = obj_open(c, "issue.details", &dmore);
        while (!e && dmore) {
          Str dk;
          e = obj_key(c, &dk);
          if (e) break;
          if (EQ(dk, "text")) e = get_string(c, "issue.details.text", &text);
          else e = skip_value(c, 4);
          e = e || obj_next(c, &dmore);
        }
      } else {
        e = skip_value(c, 3);
      }
      if (e || obj_next(c, &imore)) return FAIL;
    }
    if (nparts < MAX_ISSUES)
      parts[nparts++] =
          diag.len ? diag : text.len ? text : code.len ? code : lit_str("(no diagnostics)");
    else
      extra++;
    if (arr_next(c, &more)) return FAIL;
  }
  err_reset();
  err_lit("fhir_search refused: ");
  for (u32 i = 0; i < nparts; i++) {
    if (i) err_lit("; ");
    err_str(parts[i]);
  }
  if (!nparts) err_lit("(no issue given)");
  if (extra) {
    err_lit("; and ");
    err_u64(extra);
    err_lit(" more issues");
  }
  return FAIL;
}

// Loads the answer to a->query into a->buf, and parses it into a->res.
static int search_and_parse(Answer *a) {
  g_ctx = a->ctx;
  g_entry = -1;
  a->nres = 0;
  a->ncod = 0;
  u32 qn = cstrlen(a->query);
  u64 q = kernel_store((const u8 *)a->query, qn);
  if (!q) return fail("the kernel could not allocate the search string");
  u64 ans = fhir_search(q);
  extism_free(q);
  if (!ans) return fail("fhir_search returned no answer");
  u64 n = extism_length(ans);
  if (n == 0) return fail("fhir_search returned an empty answer");
  if (n > ANSWER_MAX) {
    err_where();
    err_lit("the answer is ");
    err_u64(n);
    err_lit(" bytes, over the limit of ");
    err_u64(ANSWER_MAX);
    return FAIL;
  }
  u8 *buf = heap_take((u32)n);
  u8 *pl = heap_take((u32)n);
  if (!buf || !pl) return fail("out of memory (the plugin's memory limit) holding the answer");
  kernel_load(ans, buf, (u32)n);
  extism_free(ans);
  pool = pl;
  pool_cap = (u32)n;
  pool_used = 0;
  if (!utf8_valid(buf, (u32)n)) return fail("the answer is not valid UTF-8");

  // The top-level members, in any order. The Bundle's entries are walked
  // where they stand once resourceType has said Bundle (the host writes it
  // first); otherwise entry, like issue, is validated, its position kept,
  // and walked once the type is known.
  Cur c = {buf, (u32)n, 0};
  enum { RT = 1, TYPE = 2, TOTAL = 4, ENTRY = 8, ISSUE = 16 };
  unsigned seen = 0;
  Str rt = {0, 0}, type = {0, 0};
  u64 total = 0;
  u32 entry_at = 0, issue_at = 0, matches = 0;
  int more, walked = 0;
  if (obj_open(&c, "the answer", &more)) return FAIL;
  while (more) {
    Str k;
    if (obj_key(&c, &k)) return FAIL;
    int e;
    if (EQ(k, "resourceType")) {
      e = once(&seen, RT, "resourceType") || get_string(&c, "resourceType", &rt);
    } else if (EQ(k, "type")) {
      e = once(&seen, TYPE, "type") || get_string(&c, "type", &type);
    } else if (EQ(k, "total")) {
      int plain, p = peek(&c);
      e = once(&seen, TOTAL, "total");
      if (!e && !(p >= '0' && p <= '9')) e = fail("total must be a non-negative integer");
      if (!e) e = number(&c, &total, &plain);
      if (!e && !plain) e = fail("total must be a non-negative integer");
    } else if (EQ(k, "entry")) {
      // The host writes resourceType first: then the entries are walked
      // right away; otherwise they are validated now and walked below.
      e = once(&seen, ENTRY, "entry");
      ws(&c);
      entry_at = c.i;
      if (!e && (seen & RT) && EQ(rt, "Bundle")) {
        walked = 1;
        e = walk_entries(&c, a, &matches);
      } else {
        e = e || skip_value(&c, 1);
      }
    } else if (EQ(k, "issue")) {
      e = once(&seen, ISSUE, "issue");
      ws(&c);
      issue_at = c.i;
      e = e || skip_value(&c, 1);
    } else {
      e = skip_value(&c, 1);
    }
    if (e || obj_next(&c, &more)) return FAIL;
  }
  if (peek(&c) != -1) return syntax(&c, "the end of the answer");

  if (!(seen & RT)) return fail("the answer has no resourceType");
  if (EQ(rt, "OperationOutcome")) {
    if (!(seen & ISSUE)) {
      err_reset();
      err_lit("fhir_search refused: (no issue given)");
      return FAIL;
    }
    Cur ic = {buf, (u32)n, issue_at};
    return refused(&ic);
  }
  if (!EQ(rt, "Bundle")) {
    err_where();
    err_lit("the answer is a ");
    err_str(rt);
    err_lit(", not a Bundle or an OperationOutcome");
    return FAIL;
  }
  if (!(seen & TYPE) || !EQ(type, "searchset")) return fail("the answer is not a searchset Bundle");
  if ((seen & ENTRY) && !walked) {
    Cur ec = {buf, (u32)n, entry_at};
    if (walk_entries(&ec, a, &matches)) return FAIL;
  }
  if ((seen & TOTAL) && total > matches) {
    err_where();
    err_lit("the search matched ");
    err_u64(total);
    err_lit(" resources but the answer holds ");
    err_u64(matches);
    err_lit("; refusing to check a partial list");
    return FAIL;
  }
  return 0;
}

// The first conflicting coding pair of (med, allergy), in coding order;
// *why is the class name. 1 if there is one. Codings were classified once
// at parse time, so a pair costs a few integer and short-string compares.
static int conflict(const Res *m, const Res *al, const Coding **mc, const Coding **ac,
                    const char **why) {
  if (!m->nrx || !al->nrx) return 0;
  for (u32 i = 0; i < m->nc; i++) {
    const Coding *x = &meds.cod[m->c0 + i];
    if (!x->rx) continue;
    for (u32 j = 0; j < al->nc; j++) {
      const Coding *y = &algs.cod[al->c0 + j];
      if (!y->rx) continue;
      if ((x->cls >= 0 && x->cls == y->cls) || str_same(x->code, y->code)) {
        *mc = x;
        *ac = y;
        *why = x->cls >= 0 ? CLASS_NAME[x->cls] : "same RxNorm code";
        return 1;
      }
    }
  }
  return 0;
}

// ---------------------------------------------------------------- output

typedef struct {
  u8 *p;
  u32 len, cap;
  int over;
} Buf;

static void put(Buf *b, const u8 *s, u32 n) {
  if (b->over || b->cap - b->len < n) {
    b->over = 1;
    return;
  }
  copy(b->p + b->len, s, n);
  b->len += n;
}

static void put_lit(Buf *b, const char *s) { put(b, (const u8 *)s, cstrlen(s)); }

// s escaped for the inside of a JSON string literal.
static void put_esc(Buf *b, Str s) {
  static const char hex[] = "0123456789abcdef";
  u32 from = 0;
  for (u32 i = 0; i < s.len; i++) {
    u8 ch = s.p[i];
    if (ch >= 0x20 && ch != '"' && ch != '\\') continue;
    put(b, s.p + from, i - from);
    from = i + 1;
    u8 esc[6] = {'\\', 'u', '0', '0', (u8)hex[ch >> 4], (u8)hex[ch & 15]};
    if (ch == '"' || ch == '\\') {
      esc[1] = ch;
      put(b, esc, 2);
    } else if (ch == '\n') {
      put_lit(b, "\\n");
    } else if (ch == '\t') {
      put_lit(b, "\\t");
    } else if (ch == '\r') {
      put_lit(b, "\\r");
    } else {
      put(b, esc, 6);
    }
  }
  put(b, s.p + from, s.len - from);
}

// A JSON string literal, quotes included.
static void put_json(Buf *b, Str s) {
  put_lit(b, "\"");
  put_esc(b, s);
  put_lit(b, "\"");
}

static void put_ref(Buf *b, const char *type, Str id) {
  put_lit(b, "{\"reference\":\"");
  put_lit(b, type);
  put_lit(b, "/");
  put(b, id.p, id.len); // a valid FHIR id needs no escaping
  put_lit(b, "\"}");
}

static void put_issue(Buf *b, const Res *m, const Res *al, const Coding *mc, const Coding *ac,
                      const char *why) {
  put_lit(b,
          "{\"resourceType\":\"DetectedIssue\",\"status\":\"preliminary\","
          "\"code\":{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ActCode\","
          "\"code\":\"DRG\",\"display\":\"Drug Interaction Alert\"}]},"
          "\"severity\":\"high\",\"patient\":{\"reference\":");
  put_json(b, g_patient);
  put_lit(b, "},\"implicated\":[");
  put_ref(b, "MedicationRequest", m->id);
  put_lit(b, ",");
  put_ref(b, "AllergyIntolerance", al->id);
  put_lit(b, "],\"detail\":");
  // "<med code> conflicts with allergy to <allergy code> (<class>)"
  put_lit(b, "\"");
  put_esc(b, mc->code);
  put_lit(b, " conflicts with allergy to ");
  put_esc(b, ac->code);
  put_lit(b, " (");
  put_lit(b, why);
  put_lit(b, ")\"");
  put_lit(b, "}");
}

// An allergy counts when it is not refuted / entered in error and, if it
// has a category, one of them is medication.
static int allergy_counts(const Res *al) {
  return !al->refuted && (!al->has_category || al->category_medication);
}

// ---------------------------------------------------------------- input

// The input must be empty, or a JSON object with no members.
static int check_input(void) {
  g_ctx = "input";
  g_entry = -1;
  u64 n = extism_input_length();
  if (n == 0) return 0;
  if (n > INPUT_MAX) return fail("check takes no input (send {} or nothing)");
  u8 in[INPUT_MAX];
  for (u32 i = 0; i < (u32)n; i++) in[i] = extism_input_load_u8(i);
  Cur c = {in, (u32)n, 0};
  if (peek(&c) == -1) return 0;
  int more;
  if (peek(&c) != '{' || obj_open(&c, "input", &more) || more || peek(&c) != -1) {
    err_reset();
    return fail("check takes no input (send {} or nothing)");
  }
  return 0;
}

// ---------------------------------------------------------------- export

static int run(void) {
  heap_reset();
  err_reset();
  g_patient.p = 0;
  g_patient.len = 0;
  pool = 0;
  pool_used = pool_cap = 0;
  g_ctx = "check";
  g_entry = -1;
  meds.type = "MedicationRequest";
  meds.query = MED_QUERY;
  meds.ctx = "answer to the MedicationRequest search";
  meds.allergy = 0;
  algs.type = "AllergyIntolerance";
  algs.query = ALG_QUERY;
  algs.ctx = "answer to the AllergyIntolerance search";
  algs.allergy = 1;
  if (check_input()) return FAIL;
  if (search_and_parse(&meds)) return FAIL;
  if (search_and_parse(&algs)) return FAIL;
  g_ctx = "check";
  g_entry = -1;

  u8 *out = heap_take(OUTPUT_MAX);
  if (!out) return fail("out of memory (the plugin's memory limit) for the output");
  Buf b = {out, 0, OUTPUT_MAX, 0};
  u32 issues = 0;
  put_lit(&b, "[");
  for (u32 i = 0; i < meds.nres && !b.over; i++) {
    for (u32 j = 0; j < algs.nres && !b.over; j++) {
      const Res *m = &meds.res[i], *al = &algs.res[j];
      const Coding *mc, *ac;
      const char *why;
      if (!allergy_counts(al) || !conflict(m, al, &mc, &ac, &why)) continue;
      if (!g_patient.len)
        return fail("a conflict was found, but no resource names its patient");
      if (issues++) put_lit(&b, ",");
      put_issue(&b, m, al, mc, ac, why);
    }
  }
  put_lit(&b, "]");
  if (b.over) {
    err_where();
    err_lit("the output would exceed ");
    err_u64(OUTPUT_MAX);
    err_lit(" bytes");
    return FAIL;
  }
  u64 off = kernel_store(b.p, b.len);
  if (!off) return fail("the kernel could not allocate the output");
  extism_output_set(off, b.len);
  return 0;
}

EXPORT(check) int check(void) {
  if (run() == 0) return 0;
  err_finish();
  u64 off = kernel_store(err_buf, err_len);
  if (off) extism_error_set(off);
  return 1;
}
