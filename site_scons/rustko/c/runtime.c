/*
 * rustko's C runtime: the stable C ABI that Rust code in a module calls.
 *
 * Compiled by Kbuild against the target kernel's real headers, so every kernel macro and struct
 * that changes between versions (printk levels, kmalloc flags, file_operations, miscdevice,
 * BUG) is resolved here, never in Rust. The Rust support crate (rust/rustko) declares the same
 * functions; changing one side means changing the other.
 */
#include <linux/bug.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#define RUSTKO_LOG(lvl) printk(lvl "%s: %.*s\n", KBUILD_MODNAME, (int)len, msg)

void rustko_printk(int level, const char *msg, unsigned long len)
{
	switch (level) {
	case 0: RUSTKO_LOG(KERN_EMERG); break;
	case 1: RUSTKO_LOG(KERN_ALERT); break;
	case 2: RUSTKO_LOG(KERN_CRIT); break;
	case 3: RUSTKO_LOG(KERN_ERR); break;
	case 4: RUSTKO_LOG(KERN_WARNING); break;
	case 5: RUSTKO_LOG(KERN_NOTICE); break;
	case 7: RUSTKO_LOG(KERN_DEBUG); break;
	default: RUSTKO_LOG(KERN_INFO); break;
	}
}

/* What the in-kernel Rust support does on panic (rust/kernel/lib.rs): BUG(). */
void rustko_bug(void)
{
	BUG();
}

/*
 * The global allocator. kmalloc aligns power-of-two sizes naturally (up to PAGE_SIZE), so a
 * larger alignment is met by rounding the size up. __GFP_NOWARN: a failed allocation is an
 * error the Rust side reports, not a kernel warning.
 */
static size_t rustko_alloc_size(size_t size, size_t align)
{
	if (align <= ARCH_KMALLOC_MINALIGN)
		return size;
	if (align > PAGE_SIZE)
		return 0;
	return size < align ? align : roundup_pow_of_two(size);
}

void *rustko_kmalloc(size_t size, size_t align, int zeroed)
{
	size_t real = rustko_alloc_size(size, align);

	if (!real)
		return NULL;
	return kmalloc(real, GFP_KERNEL | __GFP_NOWARN | (zeroed ? __GFP_ZERO : 0));
}

void *rustko_krealloc(void *ptr, size_t new_size, size_t align)
{
	size_t real = rustko_alloc_size(new_size, align);

	if (!real)
		return NULL;
	return krealloc(ptr, real, GFP_KERNEL | __GFP_NOWARN);
}

void rustko_kfree(void *ptr)
{
	kfree(ptr);
}

unsigned long rustko_copy_to_user(void __user *to, const void *from, unsigned long n)
{
	return copy_to_user(to, from, n);
}

unsigned long rustko_copy_from_user(void *to, const void __user *from, unsigned long n)
{
	return copy_from_user(to, from, n);
}

/*
 * Misc character devices. Rust hands over a name, a context pointer and two callbacks; the
 * file_operations live here because their layout changes between kernel versions.
 */
typedef long (*rustko_io_fn)(void *ctx, char __user *buf, size_t len, loff_t *pos);

struct rustko_misc {
	struct miscdevice misc;
	rustko_io_fn read;
	rustko_io_fn write;
	void *ctx;
	char name[32];
};

static struct rustko_misc *rustko_misc_of(struct file *file)
{
	struct miscdevice *misc = file->private_data;

	return container_of(misc, struct rustko_misc, misc);
}

static ssize_t rustko_misc_read(struct file *file, char __user *buf, size_t len, loff_t *pos)
{
	struct rustko_misc *dev = rustko_misc_of(file);

	return dev->read ? dev->read(dev->ctx, buf, len, pos) : -EINVAL;
}

static ssize_t rustko_misc_write(struct file *file, const char __user *buf, size_t len, loff_t *pos)
{
	struct rustko_misc *dev = rustko_misc_of(file);

	return dev->write ? dev->write(dev->ctx, (char __user *)buf, len, pos) : -EINVAL;
}

static const struct file_operations rustko_misc_fops = {
	.owner = THIS_MODULE,
	.read = rustko_misc_read,
	.write = rustko_misc_write,
	.llseek = noop_llseek,
};

void *rustko_misc_register(const char *name, unsigned long name_len, void *ctx,
			   rustko_io_fn read, rustko_io_fn write, int *err)
{
	struct rustko_misc *dev;

	if (name_len == 0 || name_len >= sizeof(dev->name)) {
		*err = -EINVAL;
		return NULL;
	}
	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev) {
		*err = -ENOMEM;
		return NULL;
	}
	memcpy(dev->name, name, name_len);
	dev->misc.minor = MISC_DYNAMIC_MINOR;
	dev->misc.name = dev->name;
	dev->misc.fops = &rustko_misc_fops;
	dev->misc.mode = 0666;
	dev->read = read;
	dev->write = write;
	dev->ctx = ctx;
	*err = misc_register(&dev->misc);
	if (*err) {
		kfree(dev);
		return NULL;
	}
	return dev;
}

void rustko_misc_deregister(void *handle)
{
	struct rustko_misc *dev = handle;

	misc_deregister(&dev->misc);
	kfree(dev);
}

/* Sleeping locks for Rust (rustko::sync::Mutex): struct mutex's size depends on the config. */
#include <linux/mutex.h>

void *rustko_mutex_new(void)
{
	struct mutex *lock = kmalloc(sizeof(*lock), GFP_KERNEL | __GFP_NOWARN);

	if (lock)
		mutex_init(lock);
	return lock;
}

void rustko_mutex_lock(void *lock)
{
	mutex_lock(lock);
}

void rustko_mutex_unlock(void *lock)
{
	mutex_unlock(lock);
}

void rustko_mutex_free(void *lock)
{
	mutex_destroy(lock);
	kfree(lock);
}
