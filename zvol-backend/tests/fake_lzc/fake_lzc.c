/*
 * A stand-in for libzfs_core.so.3, for tests/lzc_ffi.rs: the same exported functions and prototypes
 * (OpenZFS 2.1 include/libzfs_core.h), but instead of talking to /dev/zfs each call appends a line
 * describing its arguments (nvlists included, read through the real libnvpair) to CTL_DIR/log, and
 * returns the errno found in CTL_DIR/errno_<operation> (consumed), if any.
 *
 * Built by the test: cc -shared -fPIC -DCTL_DIR='"…"' fake_lzc.c -l:libnvpair.so.3
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef CTL_DIR
#error "define CTL_DIR"
#endif

typedef struct nvlist nvlist_t;
typedef struct nvpair nvpair_t;

/* libnvpair (include/sys/nvpair.h) */
extern nvlist_t *fnvlist_alloc(void);
extern void fnvlist_add_int32(nvlist_t *, const char *, int32_t);
extern nvpair_t *nvlist_next_nvpair(nvlist_t *, const nvpair_t *);
extern const char *nvpair_name(const nvpair_t *);
extern int nvpair_type(const nvpair_t *);
extern int nvpair_value_uint64(const nvpair_t *, uint64_t *);
extern int nvpair_value_string(const nvpair_t *, const char **);

enum { TYPE_BOOLEAN = 1, TYPE_UINT64 = 8, TYPE_STRING = 9 };

static char line[8192];

static void add(const char *fmt, ...)
{
	size_t used = strlen(line);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line + used, sizeof (line) - used, fmt, ap);
	va_end(ap);
}

static void emit(void)
{
	FILE *f = fopen(CTL_DIR "/log", "a");
	if (f != NULL) {
		fprintf(f, "%s\n", line);
		fclose(f);
	}
	line[0] = '\0';
}

static void dump(nvlist_t *nv)
{
	if (nv == NULL) {
		add(" (null)");
		return;
	}
	for (nvpair_t *p = nvlist_next_nvpair(nv, NULL); p != NULL; p = nvlist_next_nvpair(nv, p)) {
		uint64_t u;
		const char *s;
		switch (nvpair_type(p)) {
		case TYPE_UINT64:
			nvpair_value_uint64(p, &u);
			add(" %s=%llu", nvpair_name(p), (unsigned long long)u);
			break;
		case TYPE_STRING:
			nvpair_value_string(p, &s);
			add(" %s='%s'", nvpair_name(p), s);
			break;
		case TYPE_BOOLEAN:
			add(" %s", nvpair_name(p));
			break;
		default:
			add(" %s:type%d", nvpair_name(p), nvpair_type(p));
		}
	}
}

/* Reads and removes CTL_DIR/<name>; returns its first line (static buffer) or NULL. */
static const char *take(const char *name)
{
	static char buf[512];
	char path[1024];
	snprintf(path, sizeof (path), "%s/%s", CTL_DIR, name);
	FILE *f = fopen(path, "r");
	if (f == NULL)
		return NULL;
	if (fgets(buf, sizeof (buf), f) == NULL)
		buf[0] = '\0';
	fclose(f);
	unlink(path);
	buf[strcspn(buf, "\n")] = '\0';
	return buf;
}

static int take_errno(const char *op)
{
	char name[64];
	snprintf(name, sizeof (name), "errno_%s", op);
	const char *v = take(name);
	return v == NULL ? 0 : atoi(v);
}

/* An errlist naming the snapshot in CTL_DIR/errname_<op> (or the first one) with `err`. */
static nvlist_t *errlist_for(const char *op, nvlist_t *snaps, int err)
{
	char name[64];
	snprintf(name, sizeof (name), "errname_%s", op);
	const char *failing = take(name);
	nvlist_t *l = fnvlist_alloc();
	fnvlist_add_int32(l, "N_MORE_ERRORS", 0);
	if (failing == NULL) {
		nvpair_t *first = nvlist_next_nvpair(snaps, NULL);
		failing = first != NULL ? nvpair_name(first) : "?";
	}
	fnvlist_add_int32(l, failing, err);
	return l;
}

int libzfs_core_init(void)
{
	add("init");
	emit();
	return take_errno("init");
}

void libzfs_core_fini(void)
{
	add("fini");
	emit();
}

int lzc_create(const char *name, int type, nvlist_t *props, uint8_t *key, unsigned int keylen)
{
	add("create %s type=%d key=%s/%u", name, type, key == NULL ? "null" : "set", keylen);
	dump(props);
	emit();
	return take_errno("create");
}

int lzc_snapshot(nvlist_t *snaps, nvlist_t *props, nvlist_t **errlist)
{
	*errlist = NULL;
	add("snapshot props=%s", props == NULL ? "null" : "set");
	dump(snaps);
	emit();
	int err = take_errno("snapshot");
	if (err != 0)
		*errlist = errlist_for("snapshot", snaps, err);
	return err;
}

int lzc_clone(const char *name, const char *origin, nvlist_t *props)
{
	add("clone %s origin=%s", name, origin);
	dump(props);
	emit();
	return take_errno("clone");
}

int lzc_destroy(const char *name)
{
	add("destroy %s", name);
	emit();
	return take_errno("destroy");
}

int lzc_destroy_snaps(nvlist_t *snaps, int defer, nvlist_t **errlist)
{
	*errlist = NULL;
	add("destroy_snaps defer=%d", defer);
	dump(snaps);
	emit();
	int err = take_errno("destroy_snaps");
	if (err != 0)
		*errlist = errlist_for("destroy_snaps", snaps, err);
	return err;
}

int lzc_exists(const char *name)
{
	char path[1024];
	add("exists %s", name);
	emit();
	/* CTL_DIR/exists lists the datasets that exist, one per line. */
	snprintf(path, sizeof (path), "%s/exists", CTL_DIR);
	FILE *f = fopen(path, "r");
	if (f == NULL)
		return 0;
	char buf[512];
	int found = 0;
	while (!found && fgets(buf, sizeof (buf), f) != NULL) {
		buf[strcspn(buf, "\n")] = '\0';
		found = strcmp(buf, name) == 0;
	}
	fclose(f);
	return found;
}
