/*
 * fpolicyd._speedups: the reader's per-event hot path in C. Optional: fpolicyd runs the same without it.
 *
 * EventEncoder.encode(payload, received_at_us) does, in one call, what the pure-Python path does for a
 * SCREEN_REQ in ONTAP's canonical layout:
 *
 *   - xml_codec.fast_screen: the canonical header (NotfType SCREEN_REQ, ContentLen equal to the body's length,
 *     the layout _decode_canonical_header accepts) and the body scan of xml_fast.scan_screen_request;
 *   - events.EventBuilder.build and orjson.dumps of the event.
 *
 * It returns the event's JSON split around metadata["routes"], so that Python splices in the route list and
 * the replay flags without serialising anything again:
 *
 *   record = head + routes_json + tail + (b"," + flags_json[1:] + b"}" if flags else b"}}")
 *
 * with the values the caller needs next (event_id, dedup key, file_path, operation, ...). Anything it does not
 * read exactly as the Python path does returns None, and the caller takes the Python path, which stays the
 * reference: tests/property/test_speedups.py checks byte equality against it on captures, the simulator's
 * corpus and generated bodies. A path longer than max_path_chars (the path_max_chars setting) is one of those:
 * the Python path cuts it (events.truncate_path).
 *
 * Acceptance is a subset of xml_fast's: the same fixed element order, the same character rules for text
 * (XML characters other than CR; only the five standard entities; no "]]>"), integers of at most 19 ASCII
 * digits, element names of at most 64 ASCII letters and digits. The scan is one forward pass over at most
 * MAX_BODY_BYTES bytes with no backtracking; every read is bounds-checked against the end of the payload.
 *
 * SHA-1 (the UUIDv5 event id) is hashlib's: the encoder holds events._NAMESPACE_SHA1 and calls copy(),
 * update() and digest() on it. Session constants (VsUUID, policy, session id, versions, peer, SVM name) and
 * volume names arrive already serialised by orjson, so only text read from the body is escaped here, with
 * orjson's rules: '"' and '\\' escaped, \b \t \n \f \r, other C0 controls as \u00XX (lowercase hex), everything
 * else (DEL, non-ASCII, U+2028/2029) as UTF-8 as it is.
 *
 * split_frames(data, frames, max_frame_bytes) is XmlFrameReader's loop over the complete frames of one read.
 *
 * C99, CPython C API only, no other dependency.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------- limits */

/* Bodies above this go to Python (xml_fast.MAX_FAST_BODY_BYTES: a real SCREEN_REQ is 1-2 KiB). */
#define MAX_BODY_BYTES 65536
/* Integers: at most 19 ASCII digits, so every accepted value is below 2**64-1 and fits a uint64_t. */
#define MAX_INT_DIGITS 19
/* Names of the operation element, extras and op fields (xml_fast's _NAME): a letter, then letters/digits. */
#define MAX_NAME_CHARS 64
/* The header's ContentLen (xml_codec._decode_canonical_header allows at most 12 digits). */
#define MAX_CONTENT_LEN_DIGITS 12
/* Extras and op fields kept per notification (ONTAP sends at most ~10 op fields and no extras). Duplicate
 * names are resolved as dict() does (first position, last value) by a quadratic scan, which this bounds; a
 * body with more goes to Python. */
#define MAX_FIELDS 64
/* 10000-01-01T00:00:00Z in epoch microseconds (events.MAX_EPOCH_US: RFC 3339 has four-digit years). */
#define MAX_EPOCH_US INT64_C(253402300800000000)
/* GenerationTime below this is not epoch microseconds (events.MIN_PLAUSIBLE_GENERATION_US). */
#define MIN_PLAUSIBLE_GENERATION_US INT64_C(1000000000000000)
/* Bytes of the C stack for the event's JSON and for the identity and paths, before a buffer moves to the heap
 * (an event is ~1-2 KiB, a path well under 1 KiB). */
#define EVENT_STACK_BYTES 4096
#define PART_STACK_BYTES 1024
/* XML-mode framing (protocol/framing.py: MARKER, PREFIX_LEN). */
#define FRAME_MARKER 0x22
#define FRAME_PREFIX_LEN 6

#ifndef FPOLICYD_SPEEDUPS_SOURCE_SHA256
#define FPOLICYD_SPEEDUPS_SOURCE_SHA256 "unknown"
#endif

typedef unsigned char uchar;

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#define NOINLINE static __attribute__((noinline))
#else
#define INLINE static inline
#define NOINLINE static
#endif

/* ------------------------------------------------------------------------------------- output buffers */

typedef struct {
    char *p;
    size_t len;
    size_t cap;
    int heap;
    int failed; /* an allocation failed (MemoryError is set); later writes are dropped */
} buf_t;

/* A buffer that starts in the caller's storage (on its stack). */
static void buf_init(buf_t *b, char *storage, size_t size) {
    b->p = storage;
    b->len = 0;
    b->cap = size;
    b->heap = 0;
    b->failed = 0;
}

static void buf_free(buf_t *b) {
    if (b->heap) {
        PyMem_Free(b->p);
        b->heap = 0;
    }
    b->p = NULL;
    b->len = b->cap = 0;
}

NOINLINE int buf_grow(buf_t *b, size_t n) {
    size_t need = b->len + n, cap;
    char *p;
    if (b->failed) {
        return 0;
    }
    cap = b->cap * 2;
    while (cap < need) {
        cap *= 2;
    }
    p = b->heap ? PyMem_Realloc(b->p, cap) : PyMem_Malloc(cap);
    if (p == NULL) {
        PyErr_NoMemory();
        b->failed = 1;
        return 0;
    }
    if (!b->heap) {
        memcpy(p, b->p, b->len);
    }
    b->p = p;
    b->cap = cap;
    b->heap = 1;
    return 1;
}

/* Room for n more bytes; 0 (and failed set) when memory ran out. */
INLINE int buf_reserve(buf_t *b, size_t n) { return b->len + n <= b->cap || buf_grow(b, n); }

INLINE void put(buf_t *b, const void *s, size_t n) {
    if (buf_reserve(b, n)) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

#define PUTS(b, literal) put((b), (literal), sizeof(literal) - 1)

INLINE void put_char(buf_t *b, char c) {
    if (buf_reserve(b, 1)) {
        b->p[b->len++] = c;
    }
}

static void put_u64(buf_t *b, uint64_t v) {
    char digits[20];
    int n = 20;
    do {
        digits[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put(b, digits + n, (size_t)(20 - n));
}

INLINE void put_pybytes(buf_t *b, PyObject *bytes) {
    put(b, PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
}

/* ---------------------------------------------------------------------------------------------- JSON */

static const char HEX_DIGITS[] = "0123456789abcdef";

/* One byte that orjson escapes: '"', '\\' and the C0 controls. */
static void put_escape(buf_t *b, uchar c) {
    switch (c) {
    case '"':
        PUTS(b, "\\\"");
        break;
    case '\\':
        PUTS(b, "\\\\");
        break;
    case '\b':
        PUTS(b, "\\b");
        break;
    case '\t':
        PUTS(b, "\\t");
        break;
    case '\n':
        PUTS(b, "\\n");
        break;
    case '\f':
        PUTS(b, "\\f");
        break;
    case '\r':
        PUTS(b, "\\r");
        break;
    default: {
        char u[6] = {'\\', 'u', '0', '0', HEX_DIGITS[c >> 4], HEX_DIGITS[c & 0xF]};
        put(b, u, sizeof u);
    }
    }
}

/* Bytes that end a run of bytes copied as they are: 1 escaped by JSON ('"', '\\', C0 controls), 2 an entity's
 * '&' in XML text. Filled by init_tables. */
static uchar SPECIAL[256];

INLINE int needs_escape(uchar c) { return SPECIAL[c] == 1; }

/* Valid UTF-8 → the content of its JSON string (no quotes), as orjson writes it. */
static void put_escaped(buf_t *b, const uchar *s, size_t n) {
    size_t i, run = 0;
    for (i = 0; i < n; i++) {
        if (SPECIAL[s[i]] == 1) {
            put(b, s + run, i - run);
            put_escape(b, s[i]);
            run = i + 1;
        }
    }
    put(b, s + run, n - run);
}

/* The character an entity (validated by scan_text: one of the five) stands for, and its length. */
static size_t entity(const uchar *p, uchar *c) {
    switch (p[1]) {
    case 'a':
        if (p[2] == 'm') {
            *c = '&';
            return 5; /* &amp; */
        }
        *c = '\'';
        return 6; /* &apos; */
    case 'l':
        *c = '<';
        return 4;
    case 'g':
        *c = '>';
        return 4;
    default:
        *c = '"';
        return 6; /* &quot; */
    }
}

/* Element text as read by scan_text → the JSON string content of its decoded value (entities replaced). */
static void put_text(buf_t *b, const uchar *s, size_t n) {
    size_t i = 0, run = 0;
    uchar c;
    while (i < n) {
        if (SPECIAL[s[i]] == 0) {
            i++;
        } else if (s[i] == '&') {
            size_t len;
            put(b, s + run, i - run);
            len = entity(s + i, &c);
            if (needs_escape(c)) {
                put_escape(b, c);
            } else {
                put_char(b, (char)c);
            }
            i += len;
            run = i;
        } else {
            put(b, s + run, i - run);
            put_escape(b, s[i]);
            run = ++i;
        }
    }
    put(b, s + run, n - run);
}

/* Element text → its decoded value as UTF-8 (entities replaced; '\\' → '/' when slashes is set). */
static void put_unescaped(buf_t *b, const uchar *s, size_t n, int slashes) {
    size_t i = 0, run = 0;
    uchar c;
    while (i < n) {
        if (s[i] == '&') {
            put(b, s + run, i - run);
            i += entity(s + i, &c);
            put_char(b, (char)c);
            run = i;
        } else if (slashes && s[i] == '\\') {
            put(b, s + run, i - run);
            put_char(b, '/');
            run = ++i;
        } else {
            i++;
        }
    }
    put(b, s + run, n - run);
}

/* ---------------------------------------------------------------------------------------------- time */

static void put_digits(char *out, int64_t v, int width) {
    while (width--) {
        out[width] = (char)('0' + v % 10);
        v /= 10;
    }
}

/* Epoch microseconds in [0, MAX_EPOCH_US) → "YYYY-MM-DDTHH:MM:SS.ffffffZ" (27 bytes), as
 * events.format_rfc3339_us (H. Hinnant's civil-from-days, all in non-negative integers). */
static void format_time(int64_t us, char out[27]) {
    int64_t secs = us / 1000000, frac = us % 1000000;
    int64_t days = secs / 86400, rem = secs % 86400;
    int64_t z = days + 719468;
    int64_t era = z / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t day = doy - (153 * mp + 2) / 5 + 1;
    int64_t month = mp < 10 ? mp + 3 : mp - 9;
    int64_t year = yoe + era * 400 + (month <= 2);
    put_digits(out, year, 4);
    out[4] = '-';
    put_digits(out + 5, month, 2);
    out[7] = '-';
    put_digits(out + 8, day, 2);
    out[10] = 'T';
    put_digits(out + 11, rem / 3600, 2);
    out[13] = ':';
    put_digits(out + 14, rem % 3600 / 60, 2);
    out[16] = ':';
    put_digits(out + 17, rem % 60, 2);
    out[19] = '.';
    put_digits(out + 20, frac, 6);
    out[26] = 'Z';
}

/* --------------------------------------------------------------------------------------- body scanner */

typedef struct {
    const uchar *p;
    size_t n;
} span_t;

typedef struct {
    const uchar *p;
    const uchar *end;
} cursor_t;

INLINE int lit(cursor_t *c, const char *s, size_t n) {
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, s, n) != 0) {
        return 0;
    }
    c->p += n;
    return 1;
}

#define LIT(c, literal) lit((c), (literal), sizeof(literal) - 1)

/* The next bytes open an element ('<' and not "</"). */
INLINE int at_open(const cursor_t *c) { return c->end - c->p >= 2 && c->p[0] == '<' && c->p[1] != '/'; }

static int is_alpha(uchar c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

static int is_digit(uchar c) { return c >= '0' && c <= '9'; }

static int is_alnum(uchar c) { return is_alpha(c) || is_digit(c); }

/* Length of the valid UTF-8 sequence of a non-ASCII XML character at p, 0 if there is none: rejects what
 * Python's strict decoder rejects (overlong forms, surrogates, above U+10FFFF, truncation) and U+FFFE/U+FFFF,
 * which XML forbids. */
static size_t utf8_char(const uchar *p, const uchar *end) {
    size_t left = (size_t)(end - p);
    uchar b0 = p[0];
    if (b0 < 0xC2) {
        return 0;
    }
    if (b0 < 0xE0) {
        return left >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    }
    if (b0 < 0xF0) {
        if (left < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) {
            return 0;
        }
        if ((b0 == 0xE0 && p[1] < 0xA0) || (b0 == 0xED && p[1] >= 0xA0)) {
            return 0;
        }
        if (b0 == 0xEF && p[1] == 0xBF && p[2] >= 0xBE) {
            return 0;
        }
        return 3;
    }
    if (b0 < 0xF5) {
        if (left < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) {
            return 0;
        }
        if ((b0 == 0xF0 && p[1] < 0x90) || (b0 == 0xF4 && p[1] >= 0x90)) {
            return 0;
        }
        return 4;
    }
    return 0;
}

/* Byte classes of element text: 0 a character as it is, else what to do. Filled by init_tables. */
enum { TEXT_PLAIN, TEXT_END, TEXT_ENTITY, TEXT_FORBIDDEN, TEXT_MULTIBYTE };
static uchar TEXT_CLASS[256];

/* Element text (xml_fast's _TEXT): XML characters other than '<', '&', CR and the C0 controls but TAB and LF,
 * and the five standard entities. Stops before '<'; 0 on anything else (such a body is not canonical). */
static int scan_text(cursor_t *c, span_t *out) {
    const uchar *p = c->p, *end = c->end;
    while (p < end) {
        uchar b = *p;
        uchar k = TEXT_CLASS[b];
        if (k == TEXT_PLAIN) {
            p++;
            continue;
        }
        if (k == TEXT_END) {
            break;
        }
        if (k == TEXT_ENTITY) {
            size_t left = (size_t)(end - p);
            if (left >= 5 && memcmp(p, "&amp;", 5) == 0) {
                p += 5;
            } else if (left >= 4 && (memcmp(p, "&lt;", 4) == 0 || memcmp(p, "&gt;", 4) == 0)) {
                p += 4;
            } else if (left >= 6 && (memcmp(p, "&quot;", 6) == 0 || memcmp(p, "&apos;", 6) == 0)) {
                p += 6;
            } else {
                return 0;
            }
        } else if (k == TEXT_FORBIDDEN) {
            return 0;
        } else {
            size_t len = utf8_char(p, end);
            if (len == 0) {
                return 0;
            }
            p += len;
        }
    }
    out->p = c->p;
    out->n = (size_t)(p - c->p);
    c->p = p;
    return 1;
}

/* An unsigned integer: 1 to MAX_INT_DIGITS ASCII digits (a longer one leaves a digit where the closing tag
 * should be, so the caller's next literal fails). */
static int scan_int(cursor_t *c, uint64_t *value) {
    uint64_t v = 0;
    int n = 0;
    while (c->p < c->end && n < MAX_INT_DIGITS && is_digit(*c->p)) {
        v = v * 10 + (uint64_t)(*c->p - '0');
        c->p++;
        n++;
    }
    *value = v;
    return n > 0;
}

static int scan_name(cursor_t *c, span_t *out) {
    const uchar *p = c->p;
    if (p >= c->end || !is_alpha(*p)) {
        return 0;
    }
    p++;
    while (p < c->end && p - c->p < MAX_NAME_CHARS && is_alnum(*p)) {
        p++;
    }
    out->p = c->p;
    out->n = (size_t)(p - c->p);
    c->p = p;
    return 1;
}

static int scan_bool(cursor_t *c) { return LIT(c, "0") || LIT(c, "1") || LIT(c, "true") || LIT(c, "false"); }

/* "</" name ">" with the same name as the opening tag. */
static int close_tag(cursor_t *c, span_t name) {
    if (!LIT(c, "</") || !lit(c, (const char *)name.p, name.n)) {
        return 0;
    }
    return LIT(c, ">");
}

static int span_is(span_t s, const char *literal) {
    size_t n = strlen(literal);
    return s.n == n && memcmp(s.p, literal, n) == 0;
}

enum { USER_NONE, USER_UNIX_UID, USER_WIN_SID, USER_MAPPED_ID };

typedef struct {
    int kind;
    int has_uid;
    uint64_t uid;
    int has_sid;
    span_t sid; /* raw, not stripped */
} user_t;

/* UsrContext/FileOwner content: empty, or one choice (xml_codec._decode_user). */
static int scan_user(cursor_t *c, user_t *u) {
    u->kind = USER_NONE;
    u->has_uid = u->has_sid = 0;
    if (LIT(c, "<UnixUid>")) {
        u->kind = USER_UNIX_UID;
        u->has_uid = 1;
        return scan_int(c, &u->uid) && LIT(c, "</UnixUid>");
    }
    if (LIT(c, "<WinSid>")) {
        u->kind = USER_WIN_SID;
        u->has_sid = 1;
        return scan_text(c, &u->sid) && LIT(c, "</WinSid>");
    }
    if (LIT(c, "<MappedId>")) {
        u->kind = USER_MAPPED_ID;
        if (LIT(c, "<Uid>")) {
            u->has_uid = 1;
            if (!scan_int(c, &u->uid) || !LIT(c, "</Uid>")) {
                return 0;
            }
        }
        if (LIT(c, "<WinSid>")) {
            u->has_sid = 1;
            if (!scan_text(c, &u->sid) || !LIT(c, "</WinSid>")) {
                return 0;
            }
        }
        return LIT(c, "</MappedId>");
    }
    return 1;
}

enum { PATH_UNIX, PATH_WIN, PATH_WIN_8_3, PATH_OTHER, PATH_KINDS };

typedef struct {
    size_t count;          /* <Path> elements */
    int has[PATH_KINDS];   /* a non-empty name of that PathNameType was sent */
    span_t first[PATH_KINDS]; /* the first such name, raw */
} paths_t;

/* A path list: what events._pick_path_tuple needs of it (the first non-empty name of each PathNameType). */
static int scan_paths(cursor_t *c, paths_t *paths) {
    while (LIT(c, "<Path><PathNameType>")) {
        const uchar *type = c->p;
        size_t type_len;
        span_t name;
        int kind;
        while (c->p < c->end && (is_alnum(*c->p) || *c->p == '_')) {
            c->p++;
        }
        type_len = (size_t)(c->p - type);
        if (!LIT(c, "</PathNameType><PathName>") || !scan_text(c, &name) || !LIT(c, "</PathName></Path>")) {
            return 0;
        }
        paths->count++;
        if (type_len == 9 && memcmp(type, "UNIX_NAME", 9) == 0) {
            kind = PATH_UNIX;
        } else if (type_len == 8 && memcmp(type, "WIN_NAME", 8) == 0) {
            kind = PATH_WIN;
        } else if (type_len == 12 && memcmp(type, "WIN_8_3_NAME", 12) == 0) {
            kind = PATH_WIN_8_3;
        } else {
            kind = PATH_OTHER;
        }
        /* An entity is one character, so a name is empty exactly when its text is. */
        if (name.n && !paths->has[kind]) {
            paths->has[kind] = 1;
            paths->first[kind] = name;
        }
    }
    return 1;
}

typedef struct {
    span_t tag;
    span_t child; /* the leaf of an element of leaves (op fields: "tag/child"); n == 0 for a leaf */
    span_t value;
} field_t;

typedef struct {
    uint64_t req_id;
    span_t req_type;
    int has_client_ip;
    span_t client_ip;
    int has_generation_time;
    uint64_t generation_time;
    int has_usr_id_type;
    span_t usr_id_type;
    user_t usr; /* USER_NONE: absent or empty, both None */
    user_t owner;
    paths_t access;
    paths_t target;
    int has_vol_msid;
    uint64_t vol_msid;
    int has_file_size;
    uint64_t file_size;
    int has_file_type;
    span_t file_type;
    int has_display_path;
    span_t display_path;
    int has_prot_ver;
    uint64_t major;
    uint64_t minor;
    int gids; /* GIDS_* */
    span_t gid_region;
    int n_extra;
    int n_op;
    field_t extra[MAX_FIELDS];
    field_t op[MAX_FIELDS];
} screen_t;

enum { GIDS_NONE, GIDS_CHILDREN, GIDS_TEXT };

/* ProtCommonInfo children xml_codec reads by name: among the extras they mean another layout. */
static const char *const PCI_TAGS[] = {
    "ClientIp", "GenerationTime", "UsrIdType", "UsrContext", "FileOwner", "AccessPath",  "VolMsid",
    "FileSize", "NumHardLnk",     "IsOfflineAttr", "FileType", "IsSparse", "IsDense", NULL,
};

static int is_pci_tag(span_t tag) {
    const char *const *t;
    for (t = PCI_TAGS; *t; t++) {
        if (span_is(tag, *t)) {
            return 1;
        }
    }
    return 0;
}

/* Op-element children the decoder does not flatten, at any depth (xml_fast sends such bodies to lxml). */
static int is_reserved_op_tag(span_t tag) { return span_is(tag, "CommonInfo") || span_is(tag, "TargetAccessPath"); }

#define OPT_TEXT(c, tag, has, out)                                                                            \
    if (LIT(c, "<" tag ">")) {                                                                                 \
        (has) = 1;                                                                                             \
        if (!scan_text(c, &(out)) || !LIT(c, "</" tag ">")) {                                                  \
            return 0;                                                                                          \
        }                                                                                                      \
    }

#define OPT_INT(c, tag, has, out)                                                                             \
    if (LIT(c, "<" tag ">")) {                                                                                 \
        (has) = 1;                                                                                             \
        if (!scan_int(c, &(out)) || !LIT(c, "</" tag ">")) {                                                   \
            return 0;                                                                                          \
        }                                                                                                      \
    }

#define OPT_BOOL(c, tag)                                                                                      \
    if (LIT(c, "<" tag ">") && !(scan_bool(c) && LIT(c, "</" tag ">"))) {                                      \
        return 0;                                                                                              \
    }

/* xml_fast's layout, read in one forward pass: 1 and s filled, or 0 (not that layout: Python decides).
 *
 * Every optional element of that regex is possessive and each starts with a literal opening tag, so an
 * element that opens here and does not parse would fail the regex too: nothing later accepts that tag (an
 * extra with a ProtCommonInfo tag is refused, an op field named TargetAccessPath as well). Reading it as
 * "opened, so it must parse" therefore accepts exactly what the regex accepts, with no backtracking. */
static int scan_body(const uchar *body, size_t n, screen_t *s) {
    cursor_t cur = {body, body + n};
    cursor_t *c = &cur;
    span_t op, name;
    uint64_t ignored = 0;
    int has_ignored = 0;

    s->has_client_ip = s->has_generation_time = s->has_usr_id_type = 0;
    s->has_vol_msid = s->has_file_size = s->has_file_type = 0;
    s->has_display_path = s->has_prot_ver = 0;
    s->usr.kind = s->owner.kind = USER_NONE;
    memset(&s->access, 0, sizeof s->access);
    memset(&s->target, 0, sizeof s->target);
    s->gids = GIDS_NONE;
    s->n_extra = s->n_op = 0;
    s->major = s->minor = 0;

    if (!LIT(c, "<?xml version=\"1.0\"?><FscreenReq><ReqId>") || !scan_int(c, &s->req_id) ||
        !LIT(c, "</ReqId><ReqType>")) {
        return 0;
    }
    s->req_type.p = c->p;
    while (c->p < c->end && (is_alnum(*c->p) || *c->p == '_')) {
        c->p++;
    }
    s->req_type.n = (size_t)(c->p - s->req_type.p);
    if (s->req_type.n == 0 || !LIT(c, "</ReqType><NotfInfo><") || !scan_name(c, &op) ||
        !LIT(c, "><CommonInfo><ProtCommonInfo>")) {
        return 0;
    }
    OPT_TEXT(c, "ClientIp", s->has_client_ip, s->client_ip)
    OPT_INT(c, "GenerationTime", s->has_generation_time, s->generation_time)
    OPT_TEXT(c, "UsrIdType", s->has_usr_id_type, s->usr_id_type)
    if (LIT(c, "<UsrContext>") && !(scan_user(c, &s->usr) && LIT(c, "</UsrContext>"))) {
        return 0;
    }
    if (LIT(c, "<FileOwner>") && !(scan_user(c, &s->owner) && LIT(c, "</FileOwner>"))) {
        return 0;
    }
    if (LIT(c, "<AccessPath>") && !(scan_paths(c, &s->access) && LIT(c, "</AccessPath>"))) {
        return 0;
    }
    OPT_INT(c, "VolMsid", s->has_vol_msid, s->vol_msid)
    OPT_INT(c, "FileSize", s->has_file_size, s->file_size)
    OPT_INT(c, "NumHardLnk", has_ignored, ignored)
    (void)has_ignored;
    (void)ignored;
    OPT_BOOL(c, "IsOfflineAttr")
    OPT_TEXT(c, "FileType", s->has_file_type, s->file_type)
    OPT_BOOL(c, "IsSparse")
    OPT_BOOL(c, "IsDense")
    /* Elements this version does not know: leaves, after the known ones. */
    while (at_open(c)) {
        field_t *f;
        c->p++;
        if (s->n_extra == MAX_FIELDS || !scan_name(c, &name) || is_pci_tag(name) || !LIT(c, ">")) {
            return 0;
        }
        f = &s->extra[s->n_extra++];
        f->tag = name;
        f->child.n = 0;
        if (!scan_text(c, &f->value) || !close_tag(c, name)) {
            return 0;
        }
    }
    if (!LIT(c, "</ProtCommonInfo>")) {
        return 0;
    }
    OPT_TEXT(c, "DisplayPath", s->has_display_path, s->display_path)
    if (LIT(c, "<ProtVer>")) {
        s->has_prot_ver = 1;
        if (LIT(c, "<MajorNum>") && !(scan_int(c, &s->major) && LIT(c, "</MajorNum>"))) {
            return 0;
        }
        if (LIT(c, "<MinorNum>") && !(scan_int(c, &s->minor) && LIT(c, "</MinorNum>"))) {
            return 0;
        }
        if (!LIT(c, "</ProtVer>")) {
            return 0;
        }
    }
    if (LIT(c, "<UserGids>")) {
        s->gid_region.p = c->p;
        if (c->end - c->p >= 5 && memcmp(c->p, "<Gid>", 5) == 0) {
            s->gids = GIDS_CHILDREN;
            while (LIT(c, "<Gid>")) {
                if (!scan_text(c, &name) || !LIT(c, "</Gid>")) {
                    return 0;
                }
            }
            s->gid_region.n = (size_t)(c->p - s->gid_region.p);
        } else {
            s->gids = GIDS_TEXT;
            if (!scan_text(c, &s->gid_region)) {
                return 0;
            }
        }
        if (!LIT(c, "</UserGids>")) {
            return 0;
        }
    }
    if (!LIT(c, "</CommonInfo>")) {
        return 0;
    }
    if (LIT(c, "<TargetAccessPath>") && !(scan_paths(c, &s->target) && LIT(c, "</TargetAccessPath>"))) {
        return 0;
    }
    /* Operation fields: leaves, or elements of leaves (flattened to "tag/child"). */
    while (at_open(c)) {
        span_t tag;
        c->p++;
        if (!scan_name(c, &tag) || is_reserved_op_tag(tag) || !LIT(c, ">")) {
            return 0;
        }
        if (at_open(c)) {
            while (at_open(c)) {
                field_t *f;
                c->p++;
                if (s->n_op == MAX_FIELDS || !scan_name(c, &name) || is_reserved_op_tag(name) || !LIT(c, ">")) {
                    return 0;
                }
                f = &s->op[s->n_op++];
                f->tag = tag;
                f->child = name;
                if (!scan_text(c, &f->value) || !close_tag(c, name)) {
                    return 0;
                }
            }
        } else {
            field_t *f;
            if (s->n_op == MAX_FIELDS) {
                return 0;
            }
            f = &s->op[s->n_op++];
            f->tag = tag;
            f->child.n = 0;
            if (!scan_text(c, &f->value)) {
                return 0;
            }
        }
        if (!close_tag(c, tag)) {
            return 0;
        }
    }
    return close_tag(c, op) && LIT(c, "</NotfInfo></FscreenReq>") && c->p == c->end;
}

/* "]]>" may not appear in XML text (tags cannot contain ']'). */
static int has_cdata_end(const uchar *p, size_t n) {
    const uchar *end = p + n;
    while (n >= 3 && (p = memchr(p, ']', n - 2)) != NULL) {
        if (p[1] == ']' && p[2] == '>') {
            return 1;
        }
        p++;
        n = (size_t)(end - p);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------- text values */

/* Length of the whitespace character (Python's str.isspace) that starts at p, 0 if none. */
static size_t space_at(const uchar *p, const uchar *end) {
    size_t left = (size_t)(end - p);
    uchar b = p[0];
    if (b < 0x80) {
        return (b >= 0x09 && b <= 0x0D) || (b >= 0x1C && b <= 0x20) ? 1 : 0;
    }
    if (b == 0xC2) {
        return left >= 2 && (p[1] == 0x85 || p[1] == 0xA0) ? 2 : 0;
    }
    if (left < 3) {
        return 0;
    }
    if (b == 0xE1) {
        return p[1] == 0x9A && p[2] == 0x80 ? 3 : 0;
    }
    if (b == 0xE2) {
        if (p[1] == 0x80) {
            return p[2] <= 0x8A || p[2] == 0xA8 || p[2] == 0xA9 || p[2] == 0xAF ? 3 : 0;
        }
        return p[1] == 0x81 && p[2] == 0x9F ? 3 : 0;
    }
    if (b == 0xE3) {
        return p[1] == 0x80 && p[2] == 0x80 ? 3 : 0;
    }
    return 0;
}

/* The whitespace character that ends at end (valid UTF-8 from start), its length or 0. */
static size_t space_before(const uchar *start, const uchar *end) {
    size_t n = (size_t)(end - start);
    if (n >= 1 && end[-1] < 0x80) {
        return space_at(end - 1, end);
    }
    if (n >= 2 && end[-2] == 0xC2) {
        return space_at(end - 2, end);
    }
    if (n >= 3 && end[-3] >= 0xE0 && end[-3] < 0xF0) {
        return space_at(end - 3, end);
    }
    return 0;
}

/* str.strip() of the decoded text: entities never decode to whitespace, so the raw text strips the same. */
static span_t strip(span_t s) {
    const uchar *p = s.p, *end = s.p + s.n;
    size_t k;
    while (p < end && (k = space_at(p, end)) != 0) {
        p += k;
    }
    while (end > p && (k = space_before(p, end)) != 0) {
        end -= k;
    }
    s.p = p;
    s.n = (size_t)(end - p);
    return s;
}

/* ------------------------------------------------------------------------------------------ encoder */

typedef struct {
    PyObject_HEAD
    PyObject *namespace_sha1; /* hashlib sha1 already fed the namespace UUID's bytes */
    PyObject *req_types;      /* dict: ReqType → (operation, operation JSON, is_directory, protocol JSON, needs_previous) */
    PyObject *req_type_miss;  /* callable: ReqType → that tuple (and caches it in req_types) */
    PyObject *volumes;        /* dict: VolMsid (int or None) → volume name JSON */
    PyObject *volume_miss;    /* callable: VolMsid → volume name JSON (and caches it) */
    PyObject *vs_uuid;        /* the session constants, each as orjson serialised it */
    PyObject *policy_name;
    PyObject *session_id;
    PyObject *fpolicy_version;
    PyObject *node;
    PyObject *svm_name;
    /* Paths longer than this many characters are cut by the Python path (events.truncate_path): the encoder
     * declines such a payload. 0: no bound. */
    Py_ssize_t max_path_chars;
    /* The last ReqType and volume looked up (notifications come in runs of the same ones): the ReqType str,
     * its req_types entry, and the VolMsid with its name. */
    PyObject *last_req_type;
    PyObject *last_entry;
    int last_has_msid;
    uint64_t last_msid;
    PyObject *last_volume;
} EncoderObject;

static PyObject *str_copy, *str_update, *str_digest;

static int Encoder_traverse(EncoderObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->namespace_sha1);
    Py_VISIT(self->req_types);
    Py_VISIT(self->req_type_miss);
    Py_VISIT(self->volumes);
    Py_VISIT(self->volume_miss);
    Py_VISIT(self->last_entry);
    return 0;
}

static int Encoder_clear(EncoderObject *self) {
    Py_CLEAR(self->namespace_sha1);
    Py_CLEAR(self->req_types);
    Py_CLEAR(self->req_type_miss);
    Py_CLEAR(self->volumes);
    Py_CLEAR(self->volume_miss);
    Py_CLEAR(self->vs_uuid);
    Py_CLEAR(self->policy_name);
    Py_CLEAR(self->session_id);
    Py_CLEAR(self->fpolicy_version);
    Py_CLEAR(self->node);
    Py_CLEAR(self->svm_name);
    Py_CLEAR(self->last_req_type);
    Py_CLEAR(self->last_entry);
    Py_CLEAR(self->last_volume);
    return 0;
}

static void Encoder_dealloc(EncoderObject *self) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Encoder_clear(self);
    type->tp_free((PyObject *)self);
}

static int Encoder_init(EncoderObject *self, PyObject *args, PyObject *kwds) {
    PyObject *sha1, *req_types, *req_type_miss, *volumes, *volume_miss;
    PyObject *vs_uuid, *policy_name, *session_id, *fpolicy_version, *node, *svm_name;
    static char *kwlist[] = {"namespace_sha1", "req_types", "req_type_miss", "volumes", "volume_miss",
                             "vs_uuid_json", "policy_name_json", "session_id_json", "fpolicy_version_json",
                             "node_json", "svm_name_json", "max_path_chars", NULL};
    Py_ssize_t max_path_chars = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OO!OSSSSSS|n:EventEncoder", kwlist, &sha1, &PyDict_Type,
                                     &req_types, &req_type_miss, &PyDict_Type, &volumes, &volume_miss, &vs_uuid,
                                     &policy_name, &session_id, &fpolicy_version, &node, &svm_name,
                                     &max_path_chars)) {
        return -1;
    }
    if (max_path_chars < 0) {
        PyErr_SetString(PyExc_ValueError, "max_path_chars must be at least 0");
        return -1;
    }
    self->max_path_chars = max_path_chars;
    if (!PyCallable_Check(req_type_miss) || !PyCallable_Check(volume_miss)) {
        PyErr_SetString(PyExc_TypeError, "req_type_miss and volume_miss must be callable");
        return -1;
    }
#define SET(field, value) Py_INCREF(value); Py_XSETREF(self->field, value);
    SET(namespace_sha1, sha1)
    SET(req_types, req_types)
    SET(req_type_miss, req_type_miss)
    SET(volumes, volumes)
    SET(volume_miss, volume_miss)
    SET(vs_uuid, vs_uuid)
    SET(policy_name, policy_name)
    SET(session_id, session_id)
    SET(fpolicy_version, fpolicy_version)
    SET(node, node)
    SET(svm_name, svm_name)
#undef SET
    Py_CLEAR(self->last_req_type);
    Py_CLEAR(self->last_entry);
    Py_CLEAR(self->last_volume);
    return 0;
}

/* dict[key], else miss(key) (which caches it): a new reference, or NULL with an exception set. */
static PyObject *lookup(PyObject *dict, PyObject *miss, PyObject *key) {
    PyObject *value = PyDict_GetItemWithError(dict, key);
    if (value != NULL) {
        Py_INCREF(value);
        return value;
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyObject_CallOneArg(miss, key);
}

typedef struct {
    span_t name;
    int slashes; /* a Windows form: '\\' separators become '/' */
} pick_t;

/* events._pick_path_tuple: the first UNIX_NAME, else WIN_NAME, else WIN_8_3_NAME, else another type. */
static int pick_path(const paths_t *paths, pick_t *out) {
    int kind;
    for (kind = 0; kind < PATH_KINDS; kind++) {
        if (paths->has[kind]) {
            out->name = paths->first[kind];
            out->slashes = kind != PATH_UNIX;
            return 1;
        }
    }
    return 0;
}

/* More than max characters (code points) in valid UTF-8 (a decoded path): every byte but continuation bytes
 * starts one. */
static int utf8_longer_than(const buf_t *b, Py_ssize_t max) {
    const uchar *p = (const uchar *)b->p, *end = p + b->len;
    Py_ssize_t chars = 0;
    if ((size_t)max >= b->len) {
        return 0; /* at most one character per byte */
    }
    for (; p < end; p++) {
        if ((*p & 0xC0) != 0x80 && ++chars > max) {
            return 1;
        }
    }
    return 0;
}

/* The chosen name, rooted (events._rooted: exactly one leading '/'), decoded, as UTF-8. */
static void put_path(buf_t *b, const pick_t *pick) {
    const uchar *p = pick->name.p, *end = p + pick->name.n;
    while (p < end && (*p == '/' || (pick->slashes && *p == '\\'))) {
        p++;
    }
    put_char(b, '/');
    put_unescaped(b, p, (size_t)(end - p), pick->slashes);
}

static void put_json_string(buf_t *b, const char *s, size_t n) {
    put_char(b, '"');
    put_escaped(b, (const uchar *)s, n);
    put_char(b, '"');
}

static void put_json_text(buf_t *b, span_t s) {
    put_char(b, '"');
    put_text(b, s.p, s.n);
    put_char(b, '"');
}

static void put_opt_u64(buf_t *b, int has, uint64_t v) {
    if (has) {
        put_u64(b, v);
    } else {
        PUTS(b, "null");
    }
}

static const char *const ID_TYPES[] = {NULL, "\"UNIX_ONLY\"", "\"WIN_ONLY\"", "\"MAPPED_ID\""};

/* {"id_type": ..., "uid": ..., "sid": ...} of a user that is not USER_NONE (events._user_tuple). */
static void put_user(buf_t *b, const user_t *u, const span_t *id_type) {
    PUTS(b, "{\"id_type\":");
    if (id_type != NULL && id_type->n) {
        put_json_text(b, *id_type);
    } else {
        put(b, ID_TYPES[u->kind], strlen(ID_TYPES[u->kind]));
    }
    if (u->has_uid) {
        PUTS(b, ",\"uid\":");
        put_u64(b, u->uid);
    }
    if (u->has_sid) {
        PUTS(b, ",\"sid\":");
        put_json_text(b, strip(u->sid));
    }
    put_char(b, '}');
}

static int field_key_equal(const field_t *a, const field_t *b) {
    return a->tag.n == b->tag.n && a->child.n == b->child.n && memcmp(a->tag.p, b->tag.p, a->tag.n) == 0 &&
           (a->child.n == 0 || memcmp(a->child.p, b->child.p, a->child.n) == 0);
}

/* dict(fields) as JSON: a repeated name keeps its first position and takes its last value. */
static void put_fields(buf_t *b, const field_t *fields, int n) {
    int i, j, first = 1;
    put_char(b, '{');
    for (i = 0; i < n; i++) {
        const field_t *value = &fields[i];
        int seen = 0;
        for (j = 0; j < i && !seen; j++) {
            seen = field_key_equal(&fields[j], &fields[i]);
        }
        if (seen) {
            continue;
        }
        for (j = i + 1; j < n; j++) {
            if (field_key_equal(&fields[j], &fields[i])) {
                value = &fields[j];
            }
        }
        if (!first) {
            put_char(b, ',');
        }
        first = 0;
        /* Names are ASCII letters and digits: nothing to escape. */
        put_char(b, '"');
        put(b, fields[i].tag.p, fields[i].tag.n);
        if (fields[i].child.n) {
            put_char(b, '/');
            put(b, fields[i].child.p, fields[i].child.n);
        }
        PUTS(b, "\":");
        put_json_text(b, value->value);
    }
    put_char(b, '}');
}

/* metadata["user_gids"]: <Gid> children, each stripped (empty ones kept); or a text list split at commas and
 * whitespace. Nothing is written when the list is empty (the key is then left out). */
static void put_gids(buf_t *b, const screen_t *s) {
    if (s->gids == GIDS_CHILDREN) {
        cursor_t c = {s->gid_region.p, s->gid_region.p + s->gid_region.n};
        int first = 1;
        PUTS(b, ",\"user_gids\":[");
        while (LIT(&c, "<Gid>")) {
            span_t gid;
            scan_text(&c, &gid); /* validated by scan_body */
            LIT(&c, "</Gid>");
            if (!first) {
                put_char(b, ',');
            }
            first = 0;
            put_json_text(b, strip(gid));
        }
        put_char(b, ']');
    } else if (s->gids == GIDS_TEXT) {
        const uchar *p = s->gid_region.p, *end = p + s->gid_region.n;
        int first = 1;
        while (p < end) {
            const uchar *start;
            size_t k;
            for (;;) {
                if (p < end && *p == ',') {
                    p++;
                } else if (p < end && (k = space_at(p, end)) != 0) {
                    p += k;
                } else {
                    break;
                }
            }
            start = p;
            while (p < end && *p != ',' && space_at(p, end) == 0) {
                p++;
            }
            if (p > start) {
                span_t gid = {start, (size_t)(p - start)};
                if (first) {
                    PUTS(b, ",\"user_gids\":[");
                } else {
                    put_char(b, ',');
                }
                first = 0;
                put_json_text(b, gid);
            }
        }
        if (!first) {
            put_char(b, ']');
        }
    }
}

/* The req_types entry: (operation: str, operation JSON: bytes, is_directory: bool, protocol JSON: bytes,
 * needs_previous: bool). */
static int check_req_type_entry(PyObject *entry) {
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 5 || !PyUnicode_Check(PyTuple_GET_ITEM(entry, 0)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(entry, 1)) || !PyBool_Check(PyTuple_GET_ITEM(entry, 2)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(entry, 3)) || !PyBool_Check(PyTuple_GET_ITEM(entry, 4))) {
        PyErr_SetString(PyExc_TypeError, "a req_types entry must be (str, bytes, bool, bytes, bool)");
        return 0;
    }
    return 1;
}

static const char HEADER_HEAD[] =
    "<?xml version=\"1.0\"?><Header><NotfType>SCREEN_REQ</NotfType><ContentLen>";
static const char HEADER_TAIL[] = "</ContentLen><DataFormat>XML</DataFormat></Header>\n\n";

/* xml_codec.fast_screen's framing: split_payload (one trailing NUL dropped, the header ends at the first
 * "\n\n"), _decode_canonical_header (NotfType SCREEN_REQ, 1-12 digits of ContentLen) and ContentLen equal
 * to the body's length. The body, or 0. */
static int split_canonical(const uchar *payload, size_t n, span_t *body) {
    cursor_t c = {payload, payload + n};
    uint64_t content_len = 0;
    int digits = 0;
    if (n && payload[n - 1] == 0) {
        c.end--;
    }
    if (!LIT(&c, HEADER_HEAD)) {
        return 0;
    }
    while (c.p < c.end && digits <= MAX_CONTENT_LEN_DIGITS && is_digit(*c.p)) {
        content_len = content_len * 10 + (uint64_t)(*c.p - '0');
        c.p++;
        digits++;
    }
    if (digits == 0 || digits > MAX_CONTENT_LEN_DIGITS || !LIT(&c, HEADER_TAIL)) {
        return 0;
    }
    body->p = c.p;
    body->n = (size_t)(c.end - c.p);
    return content_len == body->n;
}

/* The event id: the UUIDv5 layout (version 5, RFC 4122 variant) over the first 128 bits of the SHA-1 digest,
 * as 16 bytes (the dedup key, pipeline/dedup_window.key_of_digest) and as text. */
static void event_id_of(const uchar digest[20], uchar key[16], char id[36]) {
    int i, j = 0;
    memcpy(key, digest, 16);
    key[6] = (uchar)((key[6] & 0x0F) | 0x50);
    key[8] = (uchar)((key[8] & 0x3F) | 0x80);
    for (i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) {
            id[j++] = '-';
        }
        id[j++] = HEX_DIGITS[key[i] >> 4];
        id[j++] = HEX_DIGITS[key[i] & 0xF];
    }
}

/* 16 big-endian bytes → a non-negative int. */
static PyObject *int_from_key(const uchar key[16]) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(key, 16, Py_ASNATIVEBYTES_BIG_ENDIAN);
#else
    return _PyLong_FromByteArray(key, 16, 0, 0);
#endif
}

/* SHA-1 of the identity JSON with hashlib: namespace_sha1.copy(), update(), digest(). */
static int sha1_digest(EncoderObject *self, const buf_t *identity, uchar digest[20]) {
    PyObject *h, *data, *r, *d;
    int ok = 0;
    h = PyObject_CallMethodNoArgs(self->namespace_sha1, str_copy);
    if (h == NULL) {
        return 0;
    }
    data = PyBytes_FromStringAndSize(identity->p, (Py_ssize_t)identity->len);
    if (data != NULL) {
        r = PyObject_CallMethodOneArg(h, str_update, data);
        Py_DECREF(data);
        if (r != NULL) {
            Py_DECREF(r);
            d = PyObject_CallMethodNoArgs(h, str_digest);
            if (d != NULL) {
                if (PyBytes_Check(d) && PyBytes_GET_SIZE(d) == 20) {
                    memcpy(digest, PyBytes_AS_STRING(d), 20);
                    ok = 1;
                } else {
                    PyErr_SetString(PyExc_TypeError, "namespace_sha1.copy().digest() is not 20 bytes");
                }
                Py_DECREF(d);
            }
        }
    }
    Py_DECREF(h);
    return ok;
}

static PyObject *Encoder_encode(EncoderObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *payload, *result = NULL;
    PyObject *req_type = NULL, *entry = NULL, *msid = NULL, *volume = NULL;
    PyObject *head = NULL, *tail = NULL, *event_id = NULL, *key = NULL, *file_path = NULL, *gen = NULL,
             *req_id = NULL;
    long long received_at_us;
    span_t body, client_ip = {NULL, 0}, file_type = {NULL, 0};
    screen_t screen, *s = &screen;
    /* out: head, then tail; identity: the event id's canonical identity (JSON); source, target: the chosen
     * paths, rooted and decoded (UTF-8). */
    buf_t out, identity, source, target;
    char out_storage[EVENT_STACK_BYTES], identity_storage[PART_STACK_BYTES];
    char source_storage[PART_STACK_BYTES], target_storage[PART_STACK_BYTES];
    pick_t source_pick, target_pick;
    int has_source, has_target, has_previous, target_missing, needs_previous, is_directory, from_generation;
    int has_client_ip;
    const buf_t *file_path_buf, *previous_buf;
    char received_at[27], timestamp[27], id[36];
    uchar digest[20], key_bytes[16];
    size_t head_len;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode(payload, received_at_us) takes 2 arguments");
        return NULL;
    }
    if (self->namespace_sha1 == NULL) {
        PyErr_SetString(PyExc_TypeError, "EventEncoder.__init__ was not called");
        return NULL;
    }
    payload = args[0];
    if (!PyBytes_Check(payload)) {
        PyErr_SetString(PyExc_TypeError, "payload must be bytes");
        return NULL;
    }
    if (!PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "received_at_us must be an int");
        return NULL;
    }
    received_at_us = PyLong_AsLongLong(args[1]);
    if (received_at_us == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return NULL;
        }
        PyErr_Clear();
        Py_RETURN_NONE; /* out of range: Python raises its own error */
    }
    if (received_at_us < 0 || received_at_us >= MAX_EPOCH_US) {
        Py_RETURN_NONE;
    }
    if (!split_canonical((const uchar *)PyBytes_AS_STRING(payload), (size_t)PyBytes_GET_SIZE(payload), &body) ||
        body.n > MAX_BODY_BYTES || has_cdata_end(body.p, body.n)) {
        Py_RETURN_NONE;
    }
    if (!scan_body(body.p, body.n, s)) {
        Py_RETURN_NONE;
    }
    buf_init(&out, out_storage, sizeof out_storage);
    buf_init(&identity, identity_storage, sizeof identity_storage);
    buf_init(&source, source_storage, sizeof source_storage);
    buf_init(&target, target_storage, sizeof target_storage);

    /* ReqType → operation, is_directory, protocol, needs previous_path (events._REQ_TYPE_CACHE). */
    if (self->last_req_type != NULL && PyUnicode_GET_LENGTH(self->last_req_type) == (Py_ssize_t)s->req_type.n &&
        memcmp(PyUnicode_1BYTE_DATA(self->last_req_type), s->req_type.p, s->req_type.n) == 0) {
        req_type = Py_NewRef(self->last_req_type);
        entry = Py_NewRef(self->last_entry);
    } else {
        req_type = PyUnicode_DecodeASCII((const char *)s->req_type.p, (Py_ssize_t)s->req_type.n, NULL);
        if (req_type == NULL || (entry = lookup(self->req_types, self->req_type_miss, req_type)) == NULL ||
            !check_req_type_entry(entry)) {
            goto error;
        }
        Py_XSETREF(self->last_req_type, Py_NewRef(req_type));
        Py_XSETREF(self->last_entry, Py_NewRef(entry));
    }
    is_directory = PyTuple_GET_ITEM(entry, 2) == Py_True;
    needs_previous = PyTuple_GET_ITEM(entry, 4) == Py_True;

    if (self->last_volume != NULL && self->last_has_msid == s->has_vol_msid &&
        (!s->has_vol_msid || self->last_msid == s->vol_msid)) {
        volume = Py_NewRef(self->last_volume);
    } else {
        msid = s->has_vol_msid ? PyLong_FromUnsignedLongLong(s->vol_msid) : Py_NewRef(Py_None);
        if (msid == NULL || (volume = lookup(self->volumes, self->volume_miss, msid)) == NULL) {
            goto error;
        }
        if (!PyBytes_Check(volume)) {
            PyErr_SetString(PyExc_TypeError, "volume_miss must return the volume name's JSON as bytes");
            goto error;
        }
        Py_XSETREF(self->last_volume, Py_NewRef(volume));
        self->last_has_msid = s->has_vol_msid;
        self->last_msid = s->vol_msid;
    }

    /* Paths (EventBuilder.build): file_path is the target when there is one, previous_path the source. */
    has_source = pick_path(&s->access, &source_pick);
    if (has_source) {
        put_path(&source, &source_pick);
    } else {
        put_char(&source, '/');
    }
    has_target = s->target.count && pick_path(&s->target, &target_pick);
    if (has_target) {
        put_path(&target, &target_pick);
    }
    target_missing = !has_target && needs_previous;
    has_previous = has_target || needs_previous;
    file_path_buf = has_target ? &target : &source;
    previous_buf = &source;
    if (source.failed || target.failed) {
        goto error;
    }
    /* A path the Python path would cut (path_max_chars): the source is file_path or previous_path, the target
     * file_path. */
    if (self->max_path_chars > 0 && (utf8_longer_than(&source, self->max_path_chars) ||
                                     (has_target && utf8_longer_than(&target, self->max_path_chars)))) {
        result = Py_NewRef(Py_None);
        goto error;
    }

    format_time(received_at_us, received_at);
    from_generation = s->has_generation_time && s->generation_time >= (uint64_t)MIN_PLAUSIBLE_GENERATION_US &&
                      s->generation_time < (uint64_t)MAX_EPOCH_US;
    if (from_generation) {
        format_time((int64_t)s->generation_time, timestamp);
    } else {
        memcpy(timestamp, received_at, sizeof timestamp);
    }
    if (s->has_client_ip) {
        client_ip = strip(s->client_ip);
    }
    has_client_ip = client_ip.n != 0;
    if (s->has_file_type) {
        file_type = strip(s->file_type);
    }

    /* The canonical identity (events.normalize): [vs_uuid, volume_msid, req_type, source_path, target_path,
     * generation_time, client_ip, uid, sid] (+ [session_id, req_id] without a usable GenerationTime). */
    {
        buf_t *b = &identity;
        const user_t *u = &s->usr;
        put_char(b, '[');
        put_pybytes(b, self->vs_uuid);
        put_char(b, ',');
        put_opt_u64(b, s->has_vol_msid, s->vol_msid);
        PUTS(b, ",\"");
        put(b, s->req_type.p, s->req_type.n);
        PUTS(b, "\",");
        put_json_string(b, source.p, source.len);
        put_char(b, ',');
        if (has_target) {
            put_json_string(b, target.p, target.len);
        } else {
            PUTS(b, "null");
        }
        put_char(b, ',');
        put_opt_u64(b, s->has_generation_time, s->generation_time);
        put_char(b, ',');
        if (has_client_ip) {
            put_json_text(b, client_ip);
        } else {
            PUTS(b, "null");
        }
        put_char(b, ',');
        put_opt_u64(b, u->kind != USER_NONE && u->has_uid, u->uid);
        put_char(b, ',');
        if (u->kind != USER_NONE && u->has_sid) {
            put_json_text(b, strip(u->sid));
        } else {
            PUTS(b, "null");
        }
        if (!from_generation) {
            put_char(b, ',');
            put_pybytes(b, self->session_id);
            put_char(b, ',');
            put_u64(b, s->req_id);
        }
        put_char(b, ']');
    }
    if (identity.failed || source.failed || target.failed ||
        !sha1_digest(self, &identity, digest)) {
        goto error;
    }
    event_id_of(digest, key_bytes, id);

    /* head: the event up to metadata["routes"]'s value (FileEvent.to_dict's key order). */
    {
        buf_t *b = &out;
        PUTS(b, "{\"event_id\":\"");
        put(b, id, sizeof id);
        PUTS(b, "\",\"operation_type\":");
        put_pybytes(b, PyTuple_GET_ITEM(entry, 1));
        PUTS(b, ",\"file_path\":");
        put_json_string(b, file_path_buf->p, file_path_buf->len);
        if (has_previous) {
            PUTS(b, ",\"previous_path\":");
            put_json_string(b, previous_buf->p, previous_buf->len);
        }
        PUTS(b, ",\"volume_name\":");
        put_pybytes(b, volume);
        PUTS(b, ",\"svm_name\":");
        put_pybytes(b, self->svm_name);
        PUTS(b, ",\"timestamp\":\"");
        put(b, timestamp, sizeof timestamp);
        PUTS(b, "\",\"file_size\":");
        put_u64(b, s->has_file_size ? s->file_size : 0);
        if (has_client_ip) {
            PUTS(b, ",\"client_ip\":");
            put_json_text(b, client_ip);
        }
        PUTS(b, ",\"metadata\":{\"req_type\":\"");
        put(b, s->req_type.p, s->req_type.n);
        PUTS(b, "\",\"req_id\":");
        put_u64(b, s->req_id);
        PUTS(b, ",\"protocol\":");
        put_pybytes(b, PyTuple_GET_ITEM(entry, 3));
        PUTS(b, ",\"protocol_version\":");
        if (s->has_prot_ver) {
            put_char(b, '"');
            put_u64(b, s->major);
            put_char(b, '.');
            put_u64(b, s->minor);
            put_char(b, '"');
        } else {
            PUTS(b, "null");
        }
        PUTS(b, ",\"fpolicy_version\":");
        put_pybytes(b, self->fpolicy_version);
        PUTS(b, ",\"is_directory\":");
        if (is_directory || (s->has_file_type && file_type.n == 3 && memcmp(file_type.p, "DIR", 3) == 0)) {
            PUTS(b, "true");
        } else {
            PUTS(b, "false");
        }
        PUTS(b, ",\"file_type\":");
        if (s->has_file_type) {
            put_json_text(b, file_type);
        } else {
            PUTS(b, "null");
        }
        PUTS(b, ",\"user\":");
        if (s->usr.kind != USER_NONE) {
            span_t id_type = {NULL, 0};
            if (s->has_usr_id_type) {
                id_type = strip(s->usr_id_type);
            }
            put_user(b, &s->usr, &id_type);
        } else if (s->has_usr_id_type) {
            PUTS(b, "{\"id_type\":");
            put_json_text(b, strip(s->usr_id_type));
            put_char(b, '}');
        } else {
            PUTS(b, "{}");
        }
        PUTS(b, ",\"vs_uuid\":");
        put_pybytes(b, self->vs_uuid);
        PUTS(b, ",\"policy_name\":");
        put_pybytes(b, self->policy_name);
        PUTS(b, ",\"session_id\":");
        put_pybytes(b, self->session_id);
        PUTS(b, ",\"volume_msid\":");
        put_opt_u64(b, s->has_vol_msid, s->vol_msid);
        PUTS(b, ",\"received_at\":\"");
        put(b, received_at, sizeof received_at);
        PUTS(b, "\",\"routes\":");
        head_len = b->len;

        /* tail: the rest of metadata; the caller appends the replay flags and closes both objects. */
        PUTS(b, ",\"timestamp_source\":");
        if (from_generation) {
            PUTS(b, "\"generation_time\"");
        } else {
            PUTS(b, "\"received\"");
        }
        PUTS(b, ",\"generation_time\":");
        put_opt_u64(b, s->has_generation_time, s->generation_time);
        PUTS(b, ",\"node\":");
        put_pybytes(b, self->node);
        if (s->owner.kind != USER_NONE) {
            PUTS(b, ",\"file_owner\":");
            put_user(b, &s->owner, NULL);
        }
        if (s->has_display_path) {
            PUTS(b, ",\"display_path\":");
            put_json_text(b, s->display_path);
        }
        if (s->n_op) {
            PUTS(b, ",\"op_fields\":");
            put_fields(b, s->op, s->n_op);
        }
        if (target_missing) {
            PUTS(b, ",\"target_missing\":true");
        }
        if (!has_source) {
            PUTS(b, ",\"path_missing\":true");
        }
        put_gids(b, s);
        if (s->n_extra) {
            PUTS(b, ",\"extra\":");
            put_fields(b, s->extra, s->n_extra);
        }
        if (b->failed) {
            goto error;
        }
    }

    head = PyBytes_FromStringAndSize(out.p, (Py_ssize_t)head_len);
    tail = PyBytes_FromStringAndSize(out.p + head_len, (Py_ssize_t)(out.len - head_len));
    event_id = PyUnicode_DecodeASCII(id, sizeof id, NULL);
    key = int_from_key(key_bytes);
    file_path = PyUnicode_DecodeUTF8(file_path_buf->p, (Py_ssize_t)file_path_buf->len, NULL);
    gen = s->has_generation_time ? PyLong_FromUnsignedLongLong(s->generation_time) : Py_NewRef(Py_None);
    req_id = PyLong_FromUnsignedLongLong(s->req_id);
    if (head == NULL || tail == NULL || event_id == NULL || key == NULL || file_path == NULL || gen == NULL ||
        req_id == NULL || (result = PyTuple_New(9)) == NULL) {
        goto error;
    }
    PyTuple_SET_ITEM(result, 0, head);
    PyTuple_SET_ITEM(result, 1, tail);
    PyTuple_SET_ITEM(result, 2, event_id);
    PyTuple_SET_ITEM(result, 3, key);
    PyTuple_SET_ITEM(result, 4, file_path);
    PyTuple_SET_ITEM(result, 5, Py_NewRef(PyTuple_GET_ITEM(entry, 0)));
    PyTuple_SET_ITEM(result, 6, gen);
    PyTuple_SET_ITEM(result, 7, req_id);
    PyTuple_SET_ITEM(result, 8, req_type);
    head = tail = event_id = key = file_path = gen = req_id = req_type = NULL;

error:
    Py_XDECREF(head);
    Py_XDECREF(tail);
    Py_XDECREF(event_id);
    Py_XDECREF(key);
    Py_XDECREF(file_path);
    Py_XDECREF(gen);
    Py_XDECREF(req_id);
    Py_XDECREF(req_type);
    Py_XDECREF(entry);
    Py_XDECREF(msid);
    Py_XDECREF(volume);
    buf_free(&out);
    buf_free(&identity);
    buf_free(&source);
    buf_free(&target);
    return result;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_FASTCALL,
     "encode(payload, received_at_us, /) -> (head, tail, event_id, key, file_path, operation, generation_time, "
     "req_id, req_type) | None\n\n"
     "One framed SCREEN_REQ payload in ONTAP's canonical layout → its event JSON split around "
     "metadata[\"routes\"]; None for anything else (the Python path decides)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fpolicyd._speedups.EventEncoder",
    .tp_basicsize = sizeof(EncoderObject),
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The events of one session, from canonical SCREEN_REQ payloads (see the module's documentation).",
    .tp_traverse = (traverseproc)Encoder_traverse,
    .tp_clear = (inquiry)Encoder_clear,
    .tp_methods = Encoder_methods,
    .tp_init = (initproc)Encoder_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------------ frame split */

/* split_frames(data, frames, max_frame_bytes, /) -> int: protocol/framing.XmlFrameReader's loop over one read.
 * Appends to the list ``frames`` the payload of each complete frame of ``data`` (bytes) from its start, while the
 * prefix is valid ('"', a u32 big-endian length from 1 to max_frame_bytes, '"'), and returns the offset of the
 * first frame it did not take: an incomplete one, a prefix that is not valid (the Python loop then raises its
 * error), or the end. Anything but bytes: 0 (the Python loop splits it). */
static PyObject *mod_split_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *data, *frames, *frame;
    const uchar *p;
    Py_ssize_t pos = 0, end, max_frame_bytes;
    size_t length;
    if (nargs != 3 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "split_frames(data, frames: list, max_frame_bytes, /)");
        return NULL;
    }
    data = args[0];
    frames = args[1];
    max_frame_bytes = PyLong_AsSsize_t(args[2]);
    if (max_frame_bytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyBytes_CheckExact(data)) {
        return PyLong_FromSsize_t(0);
    }
    p = (const uchar *)PyBytes_AS_STRING(data);
    end = PyBytes_GET_SIZE(data);
    while (end - pos >= FRAME_PREFIX_LEN) {
        if (p[pos] != FRAME_MARKER || p[pos + 5] != FRAME_MARKER) {
            break;
        }
        length = ((size_t)p[pos + 1] << 24) | ((size_t)p[pos + 2] << 16) | ((size_t)p[pos + 3] << 8) | p[pos + 4];
        if (length == 0 || (max_frame_bytes >= 0 && length > (size_t)max_frame_bytes) ||
            length > (size_t)(end - pos - FRAME_PREFIX_LEN)) {
            break;
        }
        frame = PyBytes_FromStringAndSize((const char *)p + pos + FRAME_PREFIX_LEN, (Py_ssize_t)length);
        if (frame == NULL || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            return NULL;
        }
        Py_DECREF(frame);
        pos += FRAME_PREFIX_LEN + (Py_ssize_t)length;
    }
    return PyLong_FromSsize_t(pos);
}

/* --------------------------------------------------------------------------------- test entry points */

static PyObject *mod_format_rfc3339_us(PyObject *module, PyObject *arg) {
    long long us;
    char out[27];
    (void)module;
    us = PyLong_AsLongLong(arg);
    if (us == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return NULL;
        }
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (us < 0 || us >= MAX_EPOCH_US) {
        Py_RETURN_NONE;
    }
    format_time(us, out);
    return PyUnicode_DecodeASCII(out, sizeof out, NULL);
}

static PyObject *mod_json_string(PyObject *module, PyObject *arg) {
    const char *utf8;
    Py_ssize_t n;
    buf_t b;
    char storage[PART_STACK_BYTES];
    PyObject *out;
    (void)module;
    utf8 = PyUnicode_AsUTF8AndSize(arg, &n);
    if (utf8 == NULL) {
        return NULL;
    }
    buf_init(&b, storage, sizeof storage);
    put_json_string(&b, utf8, (size_t)n);
    out = b.failed ? NULL : PyBytes_FromStringAndSize(b.p, (Py_ssize_t)b.len);
    buf_free(&b);
    return out;
}

static PyObject *mod_element_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    cursor_t c;
    span_t text;
    buf_t b;
    char storage[PART_STACK_BYTES];
    PyObject *out;
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "element_text(raw: bytes, strip: bool)");
        return NULL;
    }
    c.p = (const uchar *)PyBytes_AS_STRING(args[0]);
    c.end = c.p + PyBytes_GET_SIZE(args[0]);
    if (!scan_text(&c, &text) || c.p != c.end) {
        Py_RETURN_NONE;
    }
    switch (PyObject_IsTrue(args[1])) {
    case -1:
        return NULL;
    case 1:
        text = strip(text);
        break;
    default:
        break;
    }
    buf_init(&b, storage, sizeof storage);
    put_unescaped(&b, text.p, text.n, 0);
    out = b.failed ? NULL : PyUnicode_DecodeUTF8(b.p, (Py_ssize_t)b.len, NULL);
    buf_free(&b);
    return out;
}

static PyMethodDef module_methods[] = {
    {"split_frames", (PyCFunction)(void (*)(void))mod_split_frames, METH_FASTCALL,
     "split_frames(data, frames, max_frame_bytes, /) -> int: the complete, valid XML-mode frames of data appended "
     "to frames; the offset of the first one not taken."},
    {"format_rfc3339_us", mod_format_rfc3339_us, METH_O,
     "format_rfc3339_us(epoch_us) -> str | None: the C twin of events.format_rfc3339_us (None out of range)."},
    {"json_string", mod_json_string, METH_O, "json_string(s) -> bytes: s as a JSON string, escaped as orjson does."},
    {"element_text", (PyCFunction)(void (*)(void))mod_element_text, METH_FASTCALL,
     "element_text(raw, strip) -> str | None: XML element text as the scan reads it (None: not canonical text)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fpolicyd._speedups",
    .m_doc = "The reader's per-event hot path in C (canonical SCREEN_REQ payload -> event JSON). Optional.",
    .m_size = -1,
    .m_methods = module_methods,
};

static int add_int64(PyObject *m, const char *name, int64_t value) {
    PyObject *v = PyLong_FromLongLong(value);
    int r;
    if (v == NULL) {
        return -1;
    }
    r = PyModule_AddObjectRef(m, name, v);
    Py_DECREF(v);
    return r;
}

static void init_tables(void) {
    int c;
    for (c = 0; c < 256; c++) {
        SPECIAL[c] = (uchar)(c < 0x20 || c == '"' || c == '\\' ? 1 : c == '&' ? 2 : 0);
        if (c == '<') {
            TEXT_CLASS[c] = TEXT_END;
        } else if (c == '&') {
            TEXT_CLASS[c] = TEXT_ENTITY;
        } else if (c >= 0x80) {
            TEXT_CLASS[c] = TEXT_MULTIBYTE;
        } else if (c < 0x20 && c != '\t' && c != '\n') {
            TEXT_CLASS[c] = TEXT_FORBIDDEN;
        } else {
            TEXT_CLASS[c] = TEXT_PLAIN;
        }
    }
}

PyMODINIT_FUNC PyInit__speedups(void) {
    PyObject *m;
    init_tables();
    if (PyType_Ready(&EncoderType) < 0) {
        return NULL;
    }
    if (str_copy == NULL) {
        str_copy = PyUnicode_InternFromString("copy");
        str_update = PyUnicode_InternFromString("update");
        str_digest = PyUnicode_InternFromString("digest");
        if (str_copy == NULL || str_update == NULL || str_digest == NULL) {
            return NULL;
        }
    }
    m = PyModule_Create(&speedups_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "EventEncoder", (PyObject *)&EncoderType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BODY_BYTES", MAX_BODY_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_FIELDS", MAX_FIELDS) < 0 ||
        add_int64(m, "MAX_EPOCH_US", MAX_EPOCH_US) < 0 ||
        add_int64(m, "MIN_PLAUSIBLE_GENERATION_US", MIN_PLAUSIBLE_GENERATION_US) < 0 ||
        PyModule_AddStringConstant(m, "SOURCE_SHA256", FPOLICYD_SPEEDUPS_SOURCE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
