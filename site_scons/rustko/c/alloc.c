/* rustko runtime: alloc. */
#include <linux/log2.h>
#include <linux/slab.h>

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
