// native.c: native unit and robustness tests for src/check.c.
//
// Role: compiles the plugin source for the host machine (with ASan and
// UBSan, see run.sh) against a fake Extism kernel and a fake `fhir_search`
// that serves canned answers, then checks outputs and error messages,
// every cap, and that truncated or randomly mutated answers never crash,
// never read outside a kernel block and always end in output or an error.
//
// Invariants: the fake kernel refuses (aborts on) any load or store outside
// an allocated block, so an out-of-bounds kernel access is a test failure;
// plugin-side memory errors are caught by the sanitizers.

#include "../src/check.c"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------- fake kernel

#define KMEM (64u << 20)
#define KBLOCKS 4096
static u8 *kmem;
static u64 ktop;
static struct {
  u64 off, len;
} kblock[KBLOCKS];
static int nblocks;

static void kernel_reset(void) {
  ktop = 8;
  nblocks = 0;
}

static int block_of(u64 off, u64 n) {
  for (int b = 0; b < nblocks; b++)
    if (off >= kblock[b].off && off + n <= kblock[b].off + kblock[b].len) return b;
  fprintf(stderr, "FATAL: kernel access [%llu, +%llu) outside every block\n", off, n);
  abort();
}

u64 extism_alloc(u64 n) {
  if (nblocks == KBLOCKS || KMEM - ktop < n) return 0;
  u64 off = ktop;
  ktop += n ? n : 1;
  kblock[nblocks].off = off;
  kblock[nblocks].len = n;
  nblocks++;
  return off;
}
void extism_free(u64 off) { (void)off; }
u64 extism_length(u64 off) {
  for (int b = 0; b < nblocks; b++)
    if (kblock[b].off == off) return kblock[b].len;
  return 0;
}
u8 extism_load_u8(u64 off) {
  block_of(off, 1);
  return kmem[off];
}
u64 extism_load_u64(u64 off) {
  block_of(off, 8);
  u64 w = 0;
  for (int k = 0; k < 8; k++) w |= (u64)kmem[off + k] << (8 * k);
  return w;
}
void extism_store_u8(u64 off, u8 byte) {
  block_of(off, 1);
  kmem[off] = byte;
}
void extism_store_u64(u64 off, u64 w) {
  block_of(off, 8);
  for (int k = 0; k < 8; k++) kmem[off + k] = (u8)(w >> (8 * k));
}

static const char *in_text;
static u64 in_len;
u64 extism_input_length(void) { return in_len; }
u8 extism_input_load_u8(u64 i) {
  if (i >= in_len) {
    fprintf(stderr, "FATAL: input read past its length\n");
    abort();
  }
  return (u8)in_text[i];
}
u64 extism_input_load_u64(u64 i) {
  u64 w = 0;
  for (int k = 0; k < 8; k++) w |= (u64)extism_input_load_u8(i + k) << (8 * k);
  return w;
}

static const u8 *out_p;
static u64 out_n;
static int out_set, err_set_called;
void extism_output_set(u64 off, u64 n) {
  block_of(off, n);
  out_p = kmem + off;
  out_n = n;
  out_set = 1;
}
static const u8 *errp;
static u64 errn;
void extism_error_set(u64 off) {
  errn = extism_length(off);
  block_of(off, errn);
  errp = kmem + off;
  err_set_called = 1;
}

// Canned answers: the medication search gets med_*, the allergy search alg_*.
static const u8 *med_p, *alg_p;
static u64 med_n, alg_n;
static u64 fake_len; // when non-zero, the answer block's length is this
static int searches;
static char last_query[2][128];

static u64 answer(const u8 *p, u64 n) {
  u64 off = extism_alloc(fake_len ? fake_len : n);
  memcpy(kmem + off, p, n);
  return off;
}

u64 fhir_search(u64 q) {
  u64 n = extism_length(q);
  block_of(q, n);
  char query[128] = {0};
  memcpy(query, kmem + q, n < 127 ? n : 127);
  if (searches < 2) strcpy(last_query[searches], query);
  searches++;
  if (!strncmp(query, "MedicationRequest?", 18)) return answer(med_p, med_n);
  if (!strncmp(query, "AllergyIntolerance?", 19)) return answer(alg_p, alg_n);
  fprintf(stderr, "FATAL: unexpected query %s\n", query);
  abort();
}

// ---------------------------------------------------------------- helpers

static int failures, cases;
static char result[1 << 21];

// Runs check() once; result holds the output (rc 0) or the error (rc 1).
static int call_raw(const char *input, const u8 *mp, u64 mn, const u8 *ap, u64 an) {
  kernel_reset();
  in_text = input;
  in_len = strlen(input);
  med_p = mp, med_n = mn, alg_p = ap, alg_n = an;
  out_set = err_set_called = 0;
  searches = 0;
  int rc = check();
  if (rc == 0) {
    if (!out_set || err_set_called) {
      fprintf(stderr, "FATAL: rc 0 without output\n");
      abort();
    }
    memcpy(result, out_p, out_n);
    result[out_n] = 0;
    if (!utf8_valid(out_p, (u32)out_n)) {
      fprintf(stderr, "FATAL: output is not UTF-8\n");
      abort();
    }
  } else {
    if (out_set || !err_set_called || errn == 0 || errn > ERR_MAX) {
      fprintf(stderr, "FATAL: rc %d without a proper error (len %llu)\n", rc, errn);
      abort();
    }
    memcpy(result, errp, errn);
    result[errn] = 0;
    if (!utf8_valid(errp, (u32)errn)) {
      fprintf(stderr, "FATAL: error message is not UTF-8\n");
      abort();
    }
  }
  return rc;
}

static int call(const char *input, const char *med, const char *alg) {
  return call_raw(input, (const u8 *)med, strlen(med), (const u8 *)alg, strlen(alg));
}

static void expect(const char *name, int rc, int want_rc, const char *want, int exact) {
  cases++;
  int ok = rc == want_rc && (exact ? !strcmp(result, want) : strstr(result, want) != 0);
  if (!ok) {
    failures++;
    printf("FAIL %s: rc %d (want %d)\n  got:  %.600s\n  want: %s%s\n", name, rc, want_rc, result,
           exact ? "" : "... ", want);
  }
}

// A growable string for building answers.
typedef struct {
  char *p;
  size_t n, cap;
} S;
static void sa(S *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static void sa(S *s, const char *fmt, ...) {
  va_list ap;
  if (!s->p) {
    s->cap = 256;
    s->p = malloc(s->cap);
  }
  for (;;) {
    va_start(ap, fmt);
    int k = vsnprintf(s->p + s->n, s->cap - s->n, fmt, ap);
    va_end(ap);
    if ((size_t)k < s->cap - s->n) {
      s->n += (size_t)k;
      return;
    }
    s->cap = s->cap * 2 + (size_t)k + 64;
    s->p = realloc(s->p, s->cap);
  }
}

#define RX "http://www.nlm.nih.gov/research/umls/rxnorm"

static char *med(const char *id, const char *code, const char *pat) {
  static char buf[8][1024];
  static int k;
  char *b = buf[k++ & 7];
  snprintf(b, 1024,
           "{\"fullUrl\":\"MedicationRequest/%s\",\"resource\":{\"resourceType\":"
           "\"MedicationRequest\",\"id\":\"%s\",\"status\":\"active\",\"intent\":\"order\","
           "\"medicationCodeableConcept\":{\"coding\":[{\"system\":\"" RX
           "\",\"code\":\"%s\"}]},\"subject\":{\"reference\":\"%s\"}},\"search\":{\"mode\":"
           "\"match\"}}",
           id, id, code, pat);
  return b;
}

static char *alg(const char *id, const char *code, const char *pat, const char *extra) {
  static char buf[8][1024];
  static int k;
  char *b = buf[k++ & 7];
  snprintf(b, 1024,
           "{\"resource\":{\"resourceType\":\"AllergyIntolerance\",\"id\":\"%s\",%s\"code\":{"
           "\"coding\":[{\"system\":\"" RX
           "\",\"code\":\"%s\"}]},\"patient\":{\"reference\":\"%s\"}},\"fullUrl\":"
           "\"AllergyIntolerance/%s\"}",
           id, extra, code, pat, id);
  return b;
}

static char *bundle(int total, const char *entries) {
  static char buf[4][1 << 16];
  static int k;
  char *b = buf[k++ & 3];
  snprintf(b, sizeof buf[0],
           "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":%d,\"link\":[],"
           "\"entry\":[%s]}",
           total, entries);
  return b;
}

static const char *EMPTY = "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":0}";

#define ISSUE(pat, m, a, detail)                                                              \
  "{\"resourceType\":\"DetectedIssue\",\"status\":\"preliminary\",\"code\":{\"coding\":[{"     \
  "\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ActCode\",\"code\":\"DRG\","           \
  "\"display\":\"Drug Interaction Alert\"}]},\"severity\":\"high\",\"patient\":{\"reference\":" \
  "\"" pat "\"},\"implicated\":[{\"reference\":\"MedicationRequest/" m "\"},{\"reference\":"   \
  "\"AllergyIntolerance/" a "\"}],\"detail\":\"" detail "\"}"

static u64 rng = 0x9E3779B97F4A7C15ull;
static u64 rnd(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

// ---------------------------------------------------------------- tests

int main(void) {
  kmem = calloc(KMEM, 1);
  char e[1 << 16];
  int rc;

  // The brief's scenario: one conflict (723 vs 7980), amlodipine ignored.
  const char *meds2 = bundle(2, (snprintf(e, sizeof e, "%s,%s", med("m1", "723", "Patient/p1"),
                                          med("m2", "197361", "Patient/p1")),
                                 e));
  char meds2c[1 << 16];
  strcpy(meds2c, meds2);
  const char *alg1 = bundle(1, alg("a1", "7980", "Patient/p1", "\"category\":[\"medication\"],"));
  char alg1c[1 << 16];
  strcpy(alg1c, alg1);
  rc = call("{}", meds2c, alg1c);
  expect("basic", rc, 0,
         "[" ISSUE("Patient/p1", "m1", "a1", "723 conflicts with allergy to 7980 (penicillins)") "]",
         1);
  if (strcmp(last_query[0], MED_QUERY) || strcmp(last_query[1], ALG_QUERY)) {
    failures++;
    printf("FAIL queries: %s / %s\n", last_query[0], last_query[1]);
  }
  // Same instance, second call: same bytes (no state carried over).
  rc = call("", meds2c, alg1c);
  expect("repeat call, empty input", rc, 0, "723 conflicts with allergy to 7980", 0);
  rc = call(" \n{ }\t", meds2c, alg1c);
  expect("blank object input", rc, 0, "[{", 0);
  rc = call("{\"patient\":\"x\"}", meds2c, alg1c);
  expect("input with a member", rc, 1, "input: check takes no input (send {} or nothing)", 1);
  rc = call("[]", meds2c, alg1c);
  expect("array input", rc, 1, "check takes no input", 0);
  rc = call("{", meds2c, alg1c);
  expect("broken input", rc, 1, "check takes no input", 0);

  rc = call("{}", meds2c, EMPTY);
  expect("no allergies", rc, 0, "[]", 1);
  rc = call("{}", EMPTY, alg1c);
  expect("no medications", rc, 0, "[]", 1);

  // OperationOutcome answers.
  rc = call("{}",
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"error\",\"code\":"
            "\"forbidden\",\"diagnostics\":\"MedicationRequest: not granted\"}]}",
            EMPTY);
  expect("refused", rc, 1, "fhir_search refused: MedicationRequest: not granted", 1);
  rc = call("{}", EMPTY,
            "{\"issue\":[{\"code\":\"invalid\",\"details\":{\"text\":\"bad \\\"param\\\"\"}},"
            "{\"code\":\"forbidden\"},{\"diagnostics\":\"x\\u00e9\"}],\"resourceType\":"
            "\"OperationOutcome\"}");
  expect("refused, fallbacks, keys after issue", rc, 1,
         "fhir_search refused: bad \"param\"; forbidden; x\xc3\xa9", 1);
  rc = call("{}", "{\"resourceType\":\"OperationOutcome\",\"issue\":[]}", EMPTY);
  expect("refused without issues", rc, 1, "fhir_search refused: (no issue given)", 1);
  rc = call("{}", "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"diagnostics\":7}]}",
            EMPTY);
  expect("malformed outcome", rc, 1, "issue.diagnostics must be a string", 0);
  {
    S s = {0};
    sa(&s, "{\"resourceType\":\"OperationOutcome\",\"issue\":[");
    for (int i = 0; i < 20; i++) sa(&s, "%s{\"diagnostics\":\"d%d\"}", i ? "," : "", i);
    sa(&s, "]}");
    rc = call("{}", s.p, EMPTY);
    expect("many issues", rc, 1, "d15; and 4 more issues", 0);
    free(s.p);
  }
  {
    // A long multi-byte diagnostics: truncated at a UTF-8 boundary with "…".
    S s = {0};
    sa(&s, "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"diagnostics\":\"");
    for (int i = 0; i < 3000; i++) sa(&s, "\xe2\x82\xac");
    sa(&s, "\"}]}");
    rc = call("{}", s.p, EMPTY);
    expect("long diagnostics", rc, 1, "\xe2\x82\xac\xe2\x80\xa6", 0);
    if (strlen(result) > ERR_MAX) failures++, printf("FAIL long diagnostics: too long\n");
    free(s.p);
  }
  rc = call("{}", "{\"resourceType\":\"Patient\"}", EMPTY);
  expect("neither bundle nor outcome", rc, 1,
         "answer to the MedicationRequest search: the answer is a Patient, not a Bundle or an "
         "OperationOutcome",
         1);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"collection\"}", EMPTY);
  expect("not a searchset", rc, 1, "not a searchset Bundle", 0);
  rc = call("{}", "{\"type\":\"searchset\"}", EMPTY);
  expect("no resourceType", rc, 1, "the answer has no resourceType", 0);

  // Key order, whitespace, escapes.
  rc = call("{}",
            " { \"entry\" : [ { \"search\":{\"mode\":\"match\"}, \"resource\" : { \"subject\":"
            "{\"display\":\"x\",\"reference\":\"http://h/fhir/Patient/p1/_history/3\"},"
            "\"medicationCodeableConcept\":{\"text\":\"\\ud83d\\ude00\",\"coding\":[{\"display\":"
            "\"a\\\\b\",\"code\":\"7\\u0032\\u0033\",\"system\":\"http:\\/\\/www.nlm.nih.gov\\/"
            "research\\/umls\\/rxnorm\"}]},\"id\":\"m-1.x\",\"resource\\u0054ype\":"
            "\"MedicationRequest\"} } ] , \"total\" : 1 , \"type\":\"searchset\", "
            "\"resourceType\":\"Bundle\" } \r\n",
            alg1c);
  expect("any key order, escapes", rc, 0,
         "[" ISSUE("Patient/p1", "m-1.x", "a1",
                   "723 conflicts with allergy to 7980 (penicillins)") "]",
         1);
  // A code needing escapes in the output.
  rc = call("{}", bundle(1, med("m1", "a\\\"b\\u0001", "Patient/p1")),
            bundle(1, alg("a1", "a\\\"b\\u0001", "Patient/p1", "")));
  expect("escaped detail", rc, 0,
         "\"detail\":\"a\\\"b\\u0001 conflicts with allergy to a\\\"b\\u0001 (same RxNorm code)\"",
         0);
  rc = call("{}", bundle(1, med("m1", "\\ud800x", "Patient/p1")), EMPTY);
  expect("lone high surrogate", rc, 1, "lone high surrogate", 0);
  rc = call("{}", bundle(1, med("m1", "\\udc00", "Patient/p1")), EMPTY);
  expect("lone low surrogate", rc, 1, "lone low surrogate", 0);
  rc = call("{}",
            "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":\"\\ud800\",\"total\":0}",
            EMPTY);
  expect("lone surrogate in a skipped field", rc, 0, "[]", 1);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":\"\\q\"}", EMPTY);
  expect("bad escape", rc, 1, "a valid escape after a backslash", 0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":\"a\nb\"}", EMPTY);
  expect("raw control character", rc, 1, "no raw control character", 0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":\"\xc3\x28\"}", EMPTY);
  expect("invalid UTF-8", rc, 1, "the answer is not valid UTF-8", 0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\"} x", EMPTY);
  expect("trailing garbage", rc, 1, "expected the end of the answer", 0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":[1,]}", EMPTY);
  expect("trailing comma", rc, 1, "malformed JSON", 0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":01}", EMPTY);
  expect("leading zero", rc, 1, "malformed JSON", 0);
  rc = call("{}",
            "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":[-0.5e+3,true,false,null,"
            "{},[],\"\"]}",
            EMPTY);
  expect("all value kinds", rc, 0, "[]", 1);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"resourceType\":\"Bundle\"}", EMPTY);
  expect("duplicate top-level key", rc, 1, "resourceType appears twice in one object", 0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":-1}", EMPTY);
  expect("negative total", rc, 1, "total must be a non-negative integer", 0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":1.5}", EMPTY);
  expect("fractional total", rc, 1, "total must be a non-negative integer", 0);

  // Depth.
  {
    S s = {0};
    sa(&s, "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":");
    for (int i = 0; i < 62; i++) sa(&s, "[");
    for (int i = 0; i < 62; i++) sa(&s, "]");
    sa(&s, "}");
    rc = call("{}", s.p, EMPTY);
    expect("depth 63", rc, 0, "[]", 1);
    s.n = 0;
    sa(&s, "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"x\":");
    for (int i = 0; i < 100000; i++) sa(&s, "[");
    sa(&s, "}");
    rc = call("{}", s.p, EMPTY);
    expect("depth 100000", rc, 1, "JSON nested deeper than 64 levels", 0);
    free(s.p);
  }

  // Entries: types, ids, patients, modes.
  rc = call("{}",
            bundle(1, "{\"resource\":{\"resourceType\":\"Observation\",\"id\":\"o1\"}}"), EMPTY);
  expect("wrong resource type", rc, 1,
         "answer to the MedicationRequest search: entry[0]: resource is Observation, not a "
         "MedicationRequest",
         1);
  rc = call("{}", bundle(1, "{\"resource\":{\"resourceType\":\"MedicationRequest\"}}"), EMPTY);
  expect("no id", rc, 1, "entry[0]: resource has no id", 0);
  rc = call("{}", bundle(1, med("a/b", "723", "Patient/p1")), EMPTY);
  expect("invalid id", rc, 1, "id \"a/b\" is not a valid FHIR id", 0);
  rc = call("{}", bundle(2, (snprintf(e, sizeof e, "%s,%s", med("m1", "1", "Patient/p1"),
                                      med("m2", "1", "Patient/p2")),
                             e)),
            EMPTY);
  expect("mixed patients", rc, 1,
         "entry[1]: MedicationRequest/m2 is for Patient/p2, but MedicationRequest/m1 is for "
         "Patient/p1; refusing to mix patients",
         0);
  rc = call("{}", meds2c, bundle(1, alg("a1", "7980", "https://x/Patient/p2", "")));
  expect("mixed patients across answers", rc, 1, "refusing to mix patients", 0);
  rc = call("{}", bundle(1, med("m1", "1", "Group/g1")), EMPTY);
  expect("group subject", rc, 1, "subject.reference \"Group/g1\" is not a Patient reference", 0);
  rc = call("{}", bundle(1, med("m1", "1", "XPatient/p1")), EMPTY);
  expect("not quite Patient", rc, 1, "is not a Patient reference", 0);
  rc = call("{}", bundle(1, med("m1", "1", "Patient/")), EMPTY);
  expect("empty patient id", rc, 1, "is not a Patient reference", 0);
  rc = call("{}",
            bundle(1,
                   "{\"resource\":{\"resourceType\":\"MedicationRequest\",\"id\":\"m1\","
                   "\"status\":\"stopped\"}}"),
            EMPTY);
  expect("inactive medication", rc, 1, "has status stopped, but the search asked for active", 0);
  rc = call("{}",
            bundle(1,
                   "{\"resource\":{\"resourceType\":\"MedicationRequest\",\"id\":\"m1\"},"
                   "\"resource\":{}}"),
            EMPTY);
  expect("duplicate resource", rc, 1, "resource appears twice in one object", 0);
  rc = call("{}",
            bundle(1,
                   "{\"resource\":{\"resourceType\":\"MedicationRequest\",\"id\":\"m1\","
                   "\"medicationCodeableConcept\":{\"coding\":\"x\"}}}"),
            EMPTY);
  expect("coding not an array", rc, 1, "coding must be an array", 0);
  rc = call("{}",
            bundle(1,
                   "{\"resource\":{\"resourceType\":\"MedicationRequest\",\"id\":\"m1\","
                   "\"medicationCodeableConcept\":{\"coding\":[{\"code\":723}]}}}"),
            EMPTY);
  expect("code not a string", rc, 1, "coding.code must be a string", 0);
  rc = call("{}", bundle(1, "{\"search\":{\"mode\":\"match\"}}"), EMPTY);
  expect("entry without resource", rc, 1, "entry[0]: entry has no resource", 0);
  rc = call("{}",
            bundle(1, (snprintf(e, sizeof e,
                                "%s,{\"resource\":{\"resourceType\":\"Medication\",\"id\":\"x\"},"
                                "\"search\":{\"mode\":\"include\"}}",
                                med("m1", "723", "Patient/p1")),
                       e)),
            alg1c);
  expect("include entries skipped", rc, 0, "MedicationRequest/m1", 0);
  // A non-match entry of the expected type is dropped with its codings,
  // whatever the member order; the next match entry is unaffected.
  rc = call("{}",
            bundle(1, (snprintf(e, sizeof e,
                                "{\"search\":{\"mode\":\"include\"},\"resource\":{\"resourceType\":"
                                "\"MedicationRequest\",\"id\":\"inc\",\"medicationCodeableConcept\":"
                                "{\"coding\":[{\"system\":\"" RX "\",\"code\":\"723\"}]}}},"
                                "{\"resource\":{\"resourceType\":\"MedicationRequest\",\"id\":\"m9\","
                                "\"medicationCodeableConcept\":{\"coding\":[{\"system\":\"" RX
                                "\",\"code\":\"197361\"}]},\"subject\":{\"reference\":\"Patient/p1\"}},"
                                "\"search\":{\"mode\":\"match\"}},"
                                "{\"resource\":{\"resourceType\":\"OperationOutcome\",\"issue\":[]},"
                                "\"search\":{\"mode\":\"outcome\"}}"),
                       e)),
            alg1c);
  expect("dropped include entry", rc, 0, "[]", 1);
  rc = call("{}",
            bundle(1, (snprintf(e, sizeof e,
                                "{\"search\":{\"mode\":\"include\"},\"resource\":{\"resourceType\":"
                                "\"MedicationRequest\",\"id\":\"inc\",\"medicationCodeableConcept\":"
                                "{\"coding\":[{\"system\":\"" RX "\",\"code\":\"723\"}]}}},%s",
                                med("m1", "733", "Patient/p1")),
                       e)),
            alg1c);
  expect("match after a dropped entry", rc, 0,
         "[" ISSUE("Patient/p1", "m1", "a1", "733 conflicts with allergy to 7980 (penicillins)") "]",
         1);
  // resourceType after entry: the entries are walked in a second pass.
  rc = call("{}",
            (snprintf(e, sizeof e,
                      "{\"entry\":[%s],\"type\":\"searchset\",\"resourceType\":\"Bundle\"}",
                      med("m1", "723", "Patient/p1")),
             e),
            alg1c);
  expect("entry before resourceType", rc, 0, "MedicationRequest/m1", 0);
  rc = call("{}", "{\"entry\":[],\"resourceType\":\"OperationOutcome\",\"issue\":[{\"code\":\"x\"}]}",
            EMPTY);
  expect("outcome with an entry member", rc, 1, "fhir_search refused: x", 1);
  rc = call("{}", bundle(3, med("m1", "723", "Patient/p1")), alg1c);
  expect("paged answer", rc, 1,
         "the search matched 3 resources but the answer holds 1; refusing to check a partial "
         "list",
         0);
  rc = call("{}", "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"entry\":{}}", EMPTY);
  expect("entry not an array", rc, 1, "Bundle.entry must be an array", 0);

  // Allergy filters.
  rc = call("{}", meds2c, bundle(1, alg("a1", "7980", "Patient/p1", "\"category\":[\"food\"],")));
  expect("food allergy ignored", rc, 0, "[]", 1);
  rc = call("{}", meds2c,
            bundle(1, alg("a1", "7980", "Patient/p1", "\"category\":[\"food\",\"medication\"],")));
  expect("food+medication allergy counts", rc, 0, "AllergyIntolerance/a1", 0);
  rc = call("{}", meds2c, bundle(1, alg("a1", "7980", "Patient/p1", "\"category\":[],")));
  expect("empty category counts", rc, 0, "AllergyIntolerance/a1", 0);
  rc = call("{}", meds2c, bundle(1, alg("a1", "7980", "Patient/p1", "\"category\":\"food\",")));
  expect("category not an array", rc, 1, "category must be an array", 0);
  rc = call("{}", meds2c,
            bundle(1, alg("a1", "7980", "Patient/p1",
                          "\"verificationStatus\":{\"coding\":[{\"system\":\"" VERIFICATION
                          "\",\"code\":\"refuted\"}]},")));
  expect("refuted allergy ignored", rc, 0, "[]", 1);
  rc = call("{}", meds2c,
            bundle(1, alg("a1", "7980", "Patient/p1",
                          "\"verificationStatus\":{\"coding\":[{\"system\":\"" VERIFICATION
                          "\",\"code\":\"confirmed\"}]},")));
  expect("confirmed allergy counts", rc, 0, "AllergyIntolerance/a1", 0);
  rc = call("{}", bundle(1, med("m1", "10831", "Patient/p1")),
            bundle(1, alg("a1", "10180", "Patient/p1", "")));
  expect("sulfonamides", rc, 0, "10831 conflicts with allergy to 10180 (sulfonamides)", 0);
  rc = call("{}", bundle(1, med("m1", "10831", "Patient/p1")),
            bundle(1, alg("a1", "7980", "Patient/p1", "")));
  expect("different classes", rc, 0, "[]", 1);
  rc = call("{}", bundle(1, med("m1", "999", "Patient/p1")),
            bundle(1, alg("a1", "999", "Patient/p1", "")));
  expect("exact code", rc, 0, "999 conflicts with allergy to 999 (same RxNorm code)", 0);
  rc = call("{}", bundle(1, med("m1", "7980", "Patient/p1")),
            bundle(1, alg("a1", "7980", "Patient/p1", "")));
  expect("exact code in a class names the class", rc, 0, "(penicillins)", 0);
  rc = call("{}",
            bundle(1,
                   "{\"resource\":{\"resourceType\":\"MedicationRequest\",\"id\":\"m1\","
                   "\"medicationCodeableConcept\":{\"coding\":[{\"system\":\"http://other\","
                   "\"code\":\"723\"},{\"code\":\"723\"}]}}}"),
            alg1c);
  expect("other or no system never matches", rc, 0, "[]", 1);
  rc = call("{}",
            bundle(1,
                   "{\"resource\":{\"resourceType\":\"MedicationRequest\",\"id\":\"m1\","
                   "\"medicationCodeableConcept\":{\"coding\":[{\"system\":\"" RX
                   "\",\"code\":\"723\"}]}}}"),
            bundle(1,
                   "{\"resource\":{\"resourceType\":\"AllergyIntolerance\",\"id\":\"a1\","
                   "\"code\":{\"coding\":[{\"system\":\"" RX "\",\"code\":\"733\"}]}}}"));
  expect("conflict without any patient reference", rc, 1, "no resource names its patient", 0);
  {
    // Order: medications outer, allergies inner, answer order.
    char m[4096], a[4096];
    snprintf(m, sizeof m, "%s,%s", med("mB", "733", "Patient/p1"), med("mA", "10180", "Patient/p1"));
    snprintf(a, sizeof a, "%s,%s,%s", alg("aZ", "10831", "Patient/p1", ""),
             alg("aY", "723", "Patient/p1", ""), alg("aX", "7984", "Patient/p1", ""));
    char mb[1 << 16], ab[1 << 16];
    strcpy(mb, bundle(2, m));
    strcpy(ab, bundle(3, a));
    rc = call("{}", mb, ab);
    expect("order", rc, 0,
           "[" ISSUE("Patient/p1", "mB", "aY", "733 conflicts with allergy to 723 (penicillins)") ","
           ISSUE("Patient/p1", "mB", "aX", "733 conflicts with allergy to 7984 (penicillins)") ","
           ISSUE("Patient/p1", "mA", "aZ", "10180 conflicts with allergy to 10831 (sulfonamides)")
           "]",
           1);
  }

  // Caps.
  {
    S s = {0};
    sa(&s, "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"entry\":[");
    for (int i = 0; i < 256; i++) sa(&s, "%s%s", i ? "," : "", med("m", "723", "Patient/p1"));
    sa(&s, "]}");
    char *m256 = malloc(s.n + 1);
    memcpy(m256, s.p, s.n + 1);
    rc = call("{}", m256, alg1c);
    expect("256 entries", rc, 0, "[{", 0);
    s.n -= 2;
    sa(&s, ",%s]}", med("m", "723", "Patient/p1"));
    rc = call("{}", s.p, alg1c);
    expect("257 entries", rc, 1,
           "answer to the MedicationRequest search: more than 256 entries", 1);
    // 256 x 256 conflicts: the output would pass 1 MiB.
    S t = {0};
    sa(&t, "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"entry\":[");
    for (int i = 0; i < 256; i++) sa(&t, "%s%s", i ? "," : "", alg("a", "7980", "Patient/p1", ""));
    sa(&t, "]}");
    rc = call("{}", m256, t.p);
    expect("output cap", rc, 1, "check: the output would exceed 1048576 bytes", 1);
    free(s.p);
    free(t.p);
    free(m256);
  }
  {
    S s = {0};
    for (int n = 64; n <= 65; n++) {
      s.n = 0;
      sa(&s, "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"entry\":[{\"resource\":{"
             "\"resourceType\":\"AllergyIntolerance\",\"id\":\"a\",\"code\":{\"coding\":[");
      for (int i = 0; i < n; i++)
        sa(&s, "%s{\"system\":\"" RX "\",\"code\":\"%d\"}", i ? "," : "", i == n - 1 ? 723 : i + 100000);
      sa(&s, "]},\"patient\":{\"reference\":\"Patient/p1\"}}}]}");
      rc = call("{}", meds2c, s.p);
      if (n == 64) expect("64 codings", rc, 0, "723 conflicts with allergy to 723", 0);
      else expect("65 codings", rc, 1, "entry[0]: code has more than 64 codings", 0);
    }
    free(s.p);
  }
  {
    // An answer block longer than ANSWER_MAX is refused before it is read.
    fake_len = (u64)ANSWER_MAX + 1;
    rc = call("{}", EMPTY, EMPTY);
    fake_len = 0;
    expect("answer cap", rc, 1, "the answer is 2097153 bytes, over the limit of 2097152", 0);
  }

  // Every prefix of a valid answer fails cleanly (the full one succeeds).
  {
    size_t n = strlen(meds2c);
    int bad = 0;
    for (size_t k = 1; k < n; k++) {
      rc = call_raw("{}", (const u8 *)meds2c, k, (const u8 *)alg1c, strlen(alg1c));
      if (rc != 1) bad++;
    }
    cases++;
    if (bad) failures++, printf("FAIL prefixes: %d prefixes did not fail\n", bad);
  }

  // Random mutations of each kind of answer: never a crash, a kernel
  // access outside a block, or output that is not JSON.
  {
    const char *outcome =
        "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"error\",\"code\":"
        "\"forbidden\",\"details\":{\"text\":\"t\\u00e9\"},\"diagnostics\":\"AllergyIntolerance: "
        "not granted\"}]}";
    const char *seeds[3] = {meds2c, alg1c, outcome};
    size_t cap = strlen(meds2c) + strlen(alg1c) + 64;
    u8 *buf = malloc(cap);
    int ok = 0, err = 0;
    static const char alphabet[] = "{}[]\",:\\u0123456789abcdefABCDEF \n-+.eEtrufalsn\x80\xc3\xa9";
    for (int iter = 0; iter < 300000; iter++) {
      int which = iter % 3;
      const char *seed = seeds[which];
      size_t n = strlen(seed), m = n;
      memcpy(buf, seed, n);
      int edits = 1 + (int)(rnd() % 4);
      for (int k = 0; k < edits && m > 1; k++) {
        size_t at = (size_t)(rnd() % m);
        u8 ch = (u8)alphabet[rnd() % (sizeof alphabet - 1)];
        switch (rnd() % 3) {
        case 0: buf[at] = ch; break;
        case 1: memmove(buf + at, buf + at + 1, m - at - 1), m--; break;
        default:
          if (m < n + 60) memmove(buf + at + 1, buf + at, m - at), buf[at] = ch, m++;
        }
      }
      if (which == 0)
        rc = call_raw("{}", buf, m, (const u8 *)alg1c, strlen(alg1c));
      else if (which == 1)
        rc = call_raw("{}", (const u8 *)meds2c, strlen(meds2c), buf, m);
      else
        rc = call_raw("{}", (const u8 *)meds2c, strlen(meds2c), buf, m);
      if (rc == 0) {
        ok++;
        Cur c = {(const u8 *)result, (u32)strlen(result), 0};
        err_reset();
        if (result[0] != '[' || skip_value(&c, 0) || peek(&c) != -1) {
          failures++;
          printf("FAIL mutation produced non-JSON output: %s\n", result);
          break;
        }
      } else {
        err++;
      }
    }
    cases++;
    printf("mutations: %d gave output, %d gave an error\n", ok, err);
    free(buf);
  }

  printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
