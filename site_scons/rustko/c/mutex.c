/* rustko runtime: mutex. */
#include <linux/mutex.h>
#include <linux/slab.h>

/* Sleeping locks for Rust (rustko::sync::Mutex): struct mutex's size depends on the config. */
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
