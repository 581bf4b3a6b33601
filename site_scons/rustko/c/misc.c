/* rustko runtime: misc. */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/slab.h>
#include <linux/string.h>

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
